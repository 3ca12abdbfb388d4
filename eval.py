"""Evaluate a latentzoo checkpoint: ``python eval.py ckpt_path=...``."""

import rootutils

rootutils.setup_root(__file__, indicator=".project-root", pythonpath=True)

from latentzoo.eval import main  # noqa: E402

if __name__ == "__main__":
    main()
