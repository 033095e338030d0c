"""`python -m mm_lightning.reproduce`: mm_lightning/lecture/reproduce.py, under the command name the docs use."""

import sys

from mm_lightning.lecture.reproduce import main

if __name__ == "__main__":
    sys.exit(main())
