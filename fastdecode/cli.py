"""Command line: `fastdecode generate | chat | info | serve | bench | train-head | write-corpus`."""
from __future__ import annotations

import argparse
import json
import sys

from fastdecode.drafters import METHODS
from fastdecode.llm import DEFAULT_METHOD, DTYPES


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="a .gguf file or a Hugging Face folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES,
                   help="weights: bfloat16, float32, or block-quantized int8 (Q8_0) / int4 (Q4_1); activations fp32")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length to allocate the KV cache for")
    p.add_argument("--draft-model", default=None,
                   help="a separate draft model for method 'draft' (same tokenizer; default: an early exit of --model)")
    p.add_argument("--draft-head", default=None,
                   help="a trained draft head (a .safetensors file from `fastdecode train-head`): method 'head' "
                        "drafts with it, and 'auto' adds it to its members")
    p.add_argument("--datastore", default=None,
                   help="a corpus for 'suffix' (and 'auto') to draft from: a .jsonl file of {\"text\": ...} or "
                        "{\"ids\": [...]} rows (a `train-head --corpus` file works), or a text file")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="prefill every prompt whole (default: reuse the cached K/V of a prefix shared with an "
                        "earlier prompt, where that is bit-exact: bfloat16, int8, int4)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default=DEFAULT_METHOD, help=f"decoding method (default {DEFAULT_METHOD}): {', '.join(METHODS)}")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdecode", description="Lossless fast LLM decoding")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="complete one prompt")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as one user message (chat template)")
    gen.add_argument("--json", action="store_true", help="print one JSON object with text, token_ids, finish_reason, metrics")
    _add_model_args(gen)
    _add_sampling_args(gen)
    chat = sub.add_parser("chat", help="interactive chat, streamed")
    chat.add_argument("--system", default=None, help="a system message")
    _add_model_args(chat)
    _add_sampling_args(chat)
    info = sub.add_parser("info", help="architecture, sizes, dtype, threads")
    _add_model_args(info)
    _add_serve_parser(sub)
    _add_train_head_parser(sub)
    _add_write_corpus_parser(sub)
    try:
        from fastdecode.bench import add_bench_parser
    except ImportError:
        pass
    else:
        add_bench_parser(sub)
    return parser


def _add_train_head_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-head", help="train a draft head for method 'head' from the model alone (headtrain.py)")
    _add_model_args(p)
    p.add_argument("--out", required=True, help="where to write the head (.safetensors)")
    p.add_argument("--corpus", default=None,
                   help="a JSON-lines file of the model's own answers: read if it exists, else written")
    p.add_argument("--corpus-minutes", type=float, default=25.0, help="time to spend writing the corpus")
    p.add_argument("--batch", type=int, default=64, help="sequences decoded together while writing the corpus")
    p.add_argument("--answer-tokens", type=int, default=256, help="longest answer in the corpus")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--vocab", type=int, default=4096, help="the head's vocabulary: the corpus's most frequent tokens")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (one-cycle schedule)")
    p.add_argument("--seed", type=int, default=0)


def _add_write_corpus_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("write-corpus", help="the model writes user messages and its greedy answers (a .jsonl "
                                             "corpus for --datastore or train-head --corpus)")
    _add_model_args(p)
    p.add_argument("--out", required=True, help="where to write the corpus (.jsonl)")
    p.add_argument("--minutes", type=float, default=10.0, help="time to spend writing (at least one batch)")
    p.add_argument("--batch", type=int, default=64, help="sequences decoded together")
    p.add_argument("--answer-tokens", type=int, default=256, help="longest answer")
    p.add_argument("--seed", type=int, default=0, help="seeds the user messages")


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    _add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--method", default=DEFAULT_METHOD, help=f"default decoding method: {', '.join(METHODS)}")
    serve.add_argument("--max-batch", type=int, default=8, help="requests decoded together (one KV cache each)")
    serve.add_argument("--max-waiting", type=int, default=64, help="queued requests beyond which new ones get 429")
    serve.add_argument("--prefill-chunk", type=int, default=128,
                       help="prompt tokens a joining request prefills per step (bf16, int8, int4; fp32: whole)")
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    serve.add_argument("--served-model-name", default=None, help="the model id clients send (default: the file name)")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def _sampling(args: argparse.Namespace):
    from fastdecode import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
    )


def _llm(args: argparse.Namespace):
    from fastdecode import LLM

    return LLM(args.model, dtype=args.dtype, threads=args.threads, max_model_len=args.max_model_len,
               draft_model=args.draft_model, prefix_cache=args.prefix_cache, draft_head=args.draft_head,
               datastore=args.datastore)


def cmd_generate(args: argparse.Namespace) -> int:
    params = _sampling(args)
    llm = _llm(args)
    prompt = llm.apply_chat_template([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    if args.json:
        out = llm.generate(prompt, params, method=args.method)[0]
        record = {"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason,
                  "metrics": out.metrics.as_dict()}
        print(json.dumps(record))
        return 0
    for piece in llm.stream(prompt, params, method=args.method):
        print(piece, end="", flush=True)
    print()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    params = _sampling(args)
    llm = _llm(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("fastdecode chat: type a message, an empty line or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        reply = []
        for piece in llm.stream(llm.apply_chat_template(messages), params, method=args.method):
            reply.append(piece)
            print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})
    return 0


def cmd_train_head(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fastdecode.drafters.head import save_head
    from fastdecode.headtrain import accuracy, features, load_corpus, make_corpus, save_corpus, train

    if not args.lr > 0:
        raise ValueError(f"--lr={args.lr} must be > 0")
    for name in ("corpus_minutes", "batch", "answer_tokens", "epochs", "vocab"):
        value = getattr(args, name)
        if value < (0 if name == "corpus_minutes" else 1):
            raise ValueError(f"--{name.replace('_', '-')}={value} must be {'>= 0' if name == 'corpus_minutes' else '>= 1'}")
    out = Path(args.out)
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: folder {out.parent} does not exist")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    llm = _llm(args)
    if args.corpus and Path(args.corpus).is_file():
        corpus = load_corpus(args.corpus, llm.config.vocab_size)
        log(f"corpus: {len(corpus.seqs)} answers read from {args.corpus}")
    else:
        corpus = make_corpus(llm, args.corpus_minutes * 60, args.batch, args.answer_tokens, args.seed, log)
        if args.corpus:
            save_corpus(corpus, args.corpus)
    held = max(1, len(corpus.seqs) // 20)  # 5 % held out, to report accuracy on answers not trained on
    train_part, test_part = corpus.split(held)
    head, sub = train(llm, train_part, features(llm.model, train_part.seqs), args.epochs, args.vocab, lr=args.lr,
                      seed=args.seed, log=log)
    acc = accuracy(head, test_part, features(llm.model, test_part.seqs), llm.model.embed.weight.detach(), sub)
    save_head(out, head.hf_state(), sub, llm.config)
    print(json.dumps({"out": str(out), "answers": len(train_part.seqs), "held_out": len(test_part.seqs),
                      "held_out_top1": round(acc, 4)}))
    return 0


def cmd_write_corpus(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fastdecode.headtrain import make_corpus, save_corpus

    if not args.minutes >= 0:
        raise ValueError(f"--minutes={args.minutes} must be >= 0")
    for name in ("batch", "answer_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    out = Path(args.out)
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: folder {out.parent} does not exist")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    corpus = make_corpus(_llm(args), args.minutes * 60, args.batch, args.answer_tokens, args.seed, log)
    save_corpus(corpus, str(out))
    tokens = sum(len(ids) - start for ids, start in zip(corpus.seqs, corpus.starts))
    print(json.dumps({"out": str(out), "answers": len(corpus.seqs), "answer_tokens": tokens}))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    for key, value in _llm(args).info().items():
        print(f"{key}: {value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"generate": cmd_generate, "chat": cmd_chat, "info": cmd_info, "train-head": cmd_train_head,
                "write-corpus": cmd_write_corpus}
    if args.command == "serve":
        from fastdecode.server import serve

        commands["serve"] = serve
    if args.command == "bench":
        from fastdecode.bench import run_bench

        return run_bench(args)
    try:
        if args.command not in ("info", "train-head", "write-corpus") and args.method not in METHODS:
            raise ValueError(f"unknown method {args.method!r}; known methods: {', '.join(METHODS)}")
        return commands[args.command](args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"fastdecode: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
