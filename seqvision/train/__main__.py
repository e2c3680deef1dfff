"""``python -m seqvision.train`` (what ``torchrun ... -m seqvision.train`` runs): the ``train`` subcommand."""

import sys

from ..cli import main

sys.exit(main(["train", *sys.argv[1:]]))
