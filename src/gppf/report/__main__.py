"""``python -m gppf.report RUN_DIR``."""
from gppf.report.build import main

main()
