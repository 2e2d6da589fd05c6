"""python -m serve --models DIR [--backend torch|onnxruntime|tensorrt] [--host 127.0.0.1] [--port 50051] ..."""
import sys

from serve.server import main

if __name__ == "__main__":  # not when a spawned worker process imports it
    sys.exit(main())
