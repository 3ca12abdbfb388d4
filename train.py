"""Train a latentzoo model: ``python train.py model=... data=... trainer=...``."""

import rootutils

rootutils.setup_root(__file__, indicator=".project-root", pythonpath=True)

from latentzoo.train import main  # noqa: E402

if __name__ == "__main__":
    main()
