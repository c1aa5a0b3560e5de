import sys
from pathlib import Path

# The zoo of test models lives beside the tests; make `import zoo` work from any directory.
sys.path.insert(0, str(Path(__file__).parent))
