"""``python -m fetaliqa.simulate``: see ``fetaliqa.simulate.main``."""
from fetaliqa.simulate import main

if __name__ == "__main__":
    raise SystemExit(main())
