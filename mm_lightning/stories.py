"""`python -m mm_lightning.stories`: mm_lightning/lecture/stories.py, under the command name the docs use."""

import sys

from mm_lightning.lecture.stories import main

if __name__ == "__main__":
    sys.exit(main())
