from latentzoo.models.nets.conv import ConvDecoder, ConvEncoder

__all__ = ["ConvDecoder", "ConvEncoder"]
