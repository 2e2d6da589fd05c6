"""python -m serve.bench [--models DIR ...] [--backends ...] [--modes ...] [--quick] [--out reports/]"""
import sys

from serve.bench.cli import main

sys.exit(main())
