"""The ``synrep`` command line.

    synrep run   CONFIG [key.sub=value ...]   run the configured stages into the run directory
    synrep captions CONFIG [key.sub=value ...] write caption shards from the concept banks
    synrep rewrite  CONFIG [key.sub=value ...] write LaCLIP rewrites of the run's captions
    synrep images   CONFIG [key.sub=value ...] render k images per caption into WebDataset shards
    synrep cluster CONFIG [key.sub=value ...] MoCE: k-means clusters of the training images
    synrep train CONFIG [key.sub=value ...]   pretrain (resumes from the last checkpoint)
    synrep search CONFIG [key.sub=value ...]  MoCE: expert search, export a dense ViT
    synrep eval  CONFIG [key.sub=value ...]   evaluate the run's (or --checkpoint's) encoder
    synrep export CHECKPOINT --out DIR           the encoder as a timm model folder
    synrep embed --checkpoint PATH --dataset NAME --split SPLIT --out FILE.npz
    synrep scale CONFIG [key.sub=value ...]   train at several data sizes, fit a power law
    synrep report RUN [--out FILE] [--screenshot PNG]  write the run's HTML report
    synrep config CONFIG [key.sub=value ...]  print the resolved config

``main(argv)`` takes a list so tests run the real CLI in-process. Errors caused by input print one
message and exit with status 2. Ctrl-C (SIGINT) and SIGTERM (``kill``, a batch scheduler's stop)
both stop the command the same way: the running stage unwinds (its outputs are written under
temporary names and renamed, so nothing half-written looks finished), one line says to run the
same command again to resume, and the exit status is 130 (128 + SIGINT) or 143 (128 + SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

import torch
import yaml

from synrep import __version__
from synrep.browser import render_in_browser
from synrep.config import config_reference, load_config, save_config, shipped_configs
from synrep.errors import SynrepError
from synrep.eval.features import save_features
from synrep.eval.stage import check_eval, embed_split, evaluate_checkpoint
from synrep.export import export_encoder
from synrep.factory import load_encoder
from synrep.images.evaluate import evaluate_generator
from synrep.images.mini import train_generator
from synrep.layout import layout
from synrep.lock import run_lock
from synrep.pipeline import print_summary, run_stages
from synrep.report import write_report
from synrep.scaling import run_scaling
from synrep.utils import ensure_writable_dir
from synrep.validate import validate


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="synrep",
        description="Train vision encoders from generative models; evaluate them on real data.")
    p.add_argument("--version", action="version", version=f"synrep {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("config", nargs="?" if name == "config" else None,
                        help="a YAML config file, or a shipped config's name (quickstart, ...: "
                        "synrep config --list)")
        sp.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="override config values, e.g. train.steps=100 run.dir=/tmp/run")
        return sp

    with_config("run", "run the configured stages (run.stages) into the run directory")
    with_config("captions", "write caption shards (concept banks -> prompts -> backend -> "
                "cleaned, deduplicated JSONL) into RUN/captions")
    with_config("rewrite", "write k rewrites of every caption (LaCLIP) into RUN/rewrites")
    with_config("images", "render k images per caption with a diffusers pipeline into "
                "WebDataset shards (RUN/images)")
    with_config("train-generator", "train the mini text-to-image model on Fashion-MNIST "
                "(resumable); writes a diffusers pipeline")
    with_config("eval-generator", "measure a text-to-image pipeline (images.pipeline) on the "
                "fashion bank: class consistency, attribute adherence, diversity, Frechet "
                "distance")
    with_config("select", "offline JEST: score the run's caption groups with the learner and "
                "reference checkpoints (selection.*), keep (1 - f) of every super-batch, and "
                "write the kept ids and new shards into RUN/select")
    with_config("cluster", "MoCE: k-means on method.moce.features' features of the training "
                "images; writes the centroids and every image's cluster into RUN/cluster")
    with_config("train", "pretrain the encoder; resumes from the run's last checkpoint")
    with_config("search", "MoCE expert search: route eval.dataset's train split (eval.classes) "
                "through the clusters, keep the route (one expert per MoE block) most of its "
                "images take, export a dense ViT into RUN/search")
    ev = with_config("eval", "evaluate an encoder with frozen-feature protocols")
    ev.add_argument("--checkpoint", help="checkpoint to evaluate (default: the run's final one)")
    with_config("scale", "pretrain at several data sizes (scale.captions x "
                "scale.images_per_caption) and fit a power law of test error against data size")
    cf = with_config("config", "print the resolved config")
    cf.add_argument("--list", action="store_true", help="list the shipped configs and exit")
    cf.add_argument("--reference", action="store_true",
                    help="print every option (type, default, meaning) as Markdown and exit")

    rp = sub.add_parser("report", help="write one static HTML report of a run folder",
                        description="write one static HTML report of a run folder (captions and "
                        "images, generator settings, training curves, evaluation, PCA maps, "
                        "scaling fit)")
    rp.add_argument("run", help="run folder (run.dir), e.g. runs/quickstart")
    rp.add_argument("--out", default=None, help="HTML file to write (default: RUN/report.html)")
    rp.add_argument("--screenshot", default=None,
                    help="also render the report in headless Chromium and save a PNG screenshot")

    ex = sub.add_parser("export", help="write a checkpoint's image encoder as a timm model folder "
                        "(and its text tower for transformers)",
                        description="write a checkpoint's image encoder as a timm model folder "
                        "(config.json, model.safetensors, README.md model card), loadable with "
                        "timm.create_model('local-dir:DIR', pretrained=True) without synrep")
    ex.add_argument("checkpoint", help="a synrep checkpoint (RUN/train/checkpoints/*.safetensors)")
    ex.add_argument("--out", required=True, help="folder to write (new or empty)")
    ex.add_argument("--weights", choices=["teacher", "student"], default="teacher",
                    help="the EMA teacher's encoder when the checkpoint has one (default)")

    em = sub.add_parser("embed", help="write frozen features of a dataset split to .npz",
                        description="write frozen features (features, labels) to an .npz file")
    em.add_argument("--checkpoint", required=True)
    em.add_argument("--dataset", default="fashion-mnist")
    em.add_argument("--split", default="test")
    em.add_argument("--root", default=None, help="dataset folder (default: its usual location)")
    em.add_argument("--out", required=True, help="output .npz file")
    em.add_argument("--pool", choices=["cls", "avg", "cls+avg"], default=None,
                    help="ViT feature pooling (default: the checkpoint's eval.pool)")
    em.add_argument("--n-last-blocks", type=int, default=None)
    em.add_argument("--device", default="cpu")
    return p


def _cmd_embed(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if out.is_dir():  # before any feature is computed
        raise SynrepError(f"--out {str(out)!r} is a directory; name the .npz file to write, "
                          f"e.g. --out {str(out / 'features.npz')!r}")
    ensure_writable_dir(out.parent if str(out.parent) else Path("."), "--out")
    encoder, cfg = load_encoder(args.checkpoint, torch.device(args.device))
    ecfg = cfg.eval
    ecfg.limit_train = ecfg.limit_test = None  # embed writes the whole split
    if args.pool:
        ecfg.pool = args.pool
    if args.n_last_blocks:
        ecfg.n_last_blocks = args.n_last_blocks
    feats, labels = embed_split(encoder, ecfg, args.split, cfg.model.img_size, args.device,
                                dataset=args.dataset, root=args.root)
    save_features(out, feats, labels)
    print(f"wrote {tuple(feats.shape)} features of {args.dataset}/{args.split} to {out}")


def _cmd_report(args: argparse.Namespace) -> None:
    path = write_report(args.run, args.out)
    print(f"report: {path}")
    if args.screenshot:
        shown = render_in_browser(path, screenshot=Path(args.screenshot))
        if shown["errors"] or shown["broken_images"]:
            raise SynrepError(f"the report renders with console errors {shown['errors']} or "
                              f"broken images {shown['broken_images']}")
        print(f"screenshot: {args.screenshot}")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as a KeyboardInterrupt so every ``finally`` and
    ``except KeyboardInterrupt`` treats it as Ctrl-C."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Run one command; SIGTERM is handled as SIGINT while it runs (the previous handler is put
    back when it returns)."""
    if threading.current_thread() is not threading.main_thread():
        return _main(argv)  # only the main thread may set signal handlers
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    parser = _parser()
    # Overrides may also follow options (`eval CONFIG --checkpoint X key=value`).
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if "=" not in a or a.startswith("-") or not hasattr(args, "overrides")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        if args.command == "embed":
            _cmd_embed(args)
            return 0
        if args.command == "export":
            config = export_encoder(args.checkpoint, args.out, args.weights)
            print(f"exported {config['architecture']} ({config['num_features']} features) to "
                  f"{args.out}; load it with timm.create_model('local-dir:{args.out}', "
                  "pretrained=True)")
            if config["text_tower"] == "text":
                print(f"text tower: {Path(args.out) / 'text'} (transformers "
                      "CLIPTextModelWithProjection) and image_projection.safetensors")
            elif config["text_tower"]:
                print(f"text tower: {config['text_tower']}")
            if config["open_clip"] == "open_clip":
                print(f"open_clip: open_clip.create_model_and_transforms('local-dir:"
                      f"{Path(args.out) / 'open_clip'}')")
            elif config["open_clip"]:
                print(f"open_clip: {config['open_clip']}")
            return 0
        if args.command == "report":
            _cmd_report(args)
            return 0
        if args.command == "config" and args.reference:
            print(config_reference(), end="")
            return 0
        if args.command == "config" and (args.list or args.config is None):
            if not args.list:
                raise SynrepError("synrep config needs a config (a file or a shipped name), or "
                                  "--list or --reference")
            for name, what in shipped_configs().items():
                print(f"{name:24s} {what}")
            return 0
        cfg = load_config(args.config, args.overrides)
        validate(cfg)  # every name and cross-field rule: one line at start-up, not hours later
        if args.command == "config":
            print(yaml.safe_dump(json.loads(cfg.to_json()), sort_keys=False), end="")
        elif args.command == "run":
            run_stages(cfg)
        elif args.command == "captions":
            run_stages(cfg, ["captions"])
        elif args.command == "rewrite":
            run_stages(cfg, ["rewrites"])
        elif args.command == "images":
            run_stages(cfg, ["images"])
        elif args.command == "train-generator":
            ensure_writable_dir(cfg.run_dir, "run.dir")
            with run_lock(cfg.run_dir):
                save_config(cfg, layout(cfg).config)
                train_generator(cfg)
        elif args.command == "eval-generator":
            evaluate_generator(cfg)
        elif args.command == "select":
            run_stages(cfg, ["select"], force=True)
        elif args.command == "cluster":
            run_stages(cfg, ["cluster"], force=True)
        elif args.command == "train":
            run_stages(cfg, ["train"])
        elif args.command == "search":
            run_stages(cfg, ["search"], force=True)
        elif args.command == "scale":
            run_scaling(cfg)
        elif args.command == "eval":
            if args.checkpoint:
                ensure_writable_dir(cfg.run_dir, "run.dir")
                with run_lock(cfg.run_dir):
                    # checked before the config is written: a refused command changes nothing
                    check_eval(cfg)
                    load_encoder(args.checkpoint, "cpu", cfg.eval.weights)
                    save_config(cfg, layout(cfg).config)
                    print_summary(cfg, evaluate_checkpoint(cfg, args.checkpoint))
            else:
                run_stages(cfg, ["eval"], force=True)
    except SynrepError as e:
        print(f"synrep: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print("synrep: interrupted; run the same command again to resume", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
