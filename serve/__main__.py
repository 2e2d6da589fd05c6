"""python -m serve --models DIR [--backend torch|onnxruntime|tensorrt] [--host 127.0.0.1] [--port 50051] ..."""
import sys

from serve.server import main

sys.exit(main())
