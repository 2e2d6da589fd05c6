"""Stream generated characters to the terminal as they arrive.

    python -m clients.generate --model ID --prompt TEXT [sampling options] [--session ID]
    python -m clients.generate --list
    python -m clients.generate --model ID --prompt TEXT --predict 5
"""
from __future__ import annotations

import argparse
import sys

import grpc

from clients import api


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m clients.generate", description="charrnn streaming generation client")
    ap.add_argument("--target", default=api.DEFAULT_TARGET, help="server address host:port")
    ap.add_argument("--list", action="store_true", help="list the server's models and exit")
    ap.add_argument("--model", help="model id (see --list)")
    ap.add_argument("--prompt", default="", help="text to continue (may be empty when continuing a session)")
    ap.add_argument("--max-chars", type=int, default=0, help="characters to generate; 0: the server's default")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-k", type=int, default=0, help="0: off")
    ap.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]; default off")
    ap.add_argument("--seed", type=int, default=None, help="default: the server picks one (printed with --stats)")
    ap.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    ap.add_argument("--session", default="", help="session id: continue from and keep the state")
    ap.add_argument("--require-session", action="store_true", help="fail if the session has no state")
    ap.add_argument("--chunk-chars", type=int, default=0, help="characters per message; 0: 1")
    ap.add_argument("--coalesce", action="store_true",
                    help="chunk-chars or more per message: characters made while the last message was being sent "
                         "come together in the next")
    ap.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    ap.add_argument("--stats", action="store_true", help="print finish reason and timings to stderr")
    ap.add_argument("--predict", type=int, metavar="K", default=0,
                    help="instead of generating: the K most likely next characters after the prompt")
    args = ap.parse_args(argv)
    if not args.list and args.model is None:
        ap.error("--model is required (or --list)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    stub = api.stub(args.target)
    try:
        if args.list:
            for m in api.list_models(stub, args.timeout):
                print(f"{m.id}\t{m.cell} h{m.hidden_size} fc{m.fc_layers}\t{len(m.vocab)} chars\t{m.backend}")
        elif args.predict:
            for ch, p in api.predict(stub, args.model, args.prompt, args.predict, args.timeout):
                print(f"{ch!r}\t{p:.4f}")
        else:
            request = api.generate_request(
                args.model, args.prompt, args.max_chars, args.temperature, args.top_k, args.top_p, args.seed,
                tuple(args.stop), args.session, args.chunk_chars, args.require_session, args.coalesce)
            last = None
            for last in api.generate(stub, request, args.timeout):
                sys.stdout.write(last.text)
                sys.stdout.flush()
            sys.stdout.write("\n")
            if args.stats and last is not None:
                s = last.stats
                print(f"finish: {api.FINISH.get(last.finish_reason, '?')}{f' ({s.stop!r})' if s.stop else ''}; "
                      f"{s.generated_chars} chars; first after {s.time_to_first_char_s * 1e3:.1f} ms; "
                      f"{s.chars_per_second:.0f} chars/s; seed {s.seed}"
                      + (f"; session {api.SESSION[s.session]}" if s.session else ""), file=sys.stderr)
    except grpc.RpcError as e:
        print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
