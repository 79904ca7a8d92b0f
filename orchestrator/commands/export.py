"""``orchestrator export CKPT OUT``: consolidate a ZeRO checkpoint into one fp32 state dict."""

from __future__ import annotations

import json
import sys


def register(sub) -> None:
    p = sub.add_parser("export", help="consolidate a checkpoint (any ZeRO stage, any world size) "
                                      "into fp32 weights a plain torch.nn.Module loads")
    p.add_argument("checkpoint", help="checkpoint root URL, a step-XXXXXXXX directory, or a native "
                                      "DeepSpeed checkpoint directory")
    p.add_argument("out", help="output directory URL (model.pt + model.json)")
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    p.set_defaults(func=run)


def run(args) -> int:
    from actors.trainer.checkpoint import CheckpointError
    from actors.trainer.export import export
    from orchestrator.storage import StorageError
    opts = {"endpoint_url": args.endpoint_url} if args.endpoint_url else None
    try:
        report = export(args.checkpoint, args.out, opts)
    except (CheckpointError, StorageError) as e:
        print(f"export failed: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report))
    return 0
