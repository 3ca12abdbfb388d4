from latentzoo.models.nets.conv import ConvDecoder, ConvEncoder
from latentzoo.models.nets.lie import GroupEncoder, LieAlgebra

__all__ = ["ConvDecoder", "ConvEncoder", "GroupEncoder", "LieAlgebra"]
