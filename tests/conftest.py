"""Test-session set-up shared by every test module."""

import sys
from pathlib import Path

# The package under test is the installed one (site-packages); the repository root
# goes at the END of sys.path only so that the recipes in models/ import as `models`.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))
