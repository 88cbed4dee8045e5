"""Write COCO-format scenes of real images: python tools/make_scenes.py --source digits --out data/scenes/digits"""
import sys

from hat.data.scenes import main

if __name__ == "__main__":
    sys.exit(main())
