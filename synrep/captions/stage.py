"""The captions stage (concept banks -> prompts -> backend -> cleaned JSONL shards) and the LaCLIP
rewrite stage (caption shards -> k rewrites per caption).

Output, in ``RUN/captions``: ``captions-00000.jsonl`` ... one JSON row per caption with its
provenance (``caption_id, caption, concept, concept_id, bank, template, demo_ids, backend, model,
seed, sampling`` and, where they apply, ``label, background, relation, attributes``); each shard's
``<name>_stats.json`` marker (row count, sha256, the config it was made with, rejections by
reason); ``sizes.json`` and ``stats.json`` once every shard is complete.

Shard ``i`` is a pure function of the config, the seed and the shards before it (dedup is
global), so a killed run that is started again skips complete shards, redoes the partial one and
ends byte-identical to an uninterrupted run. A backend whose output is unusable (empty, echoing
the prompt, off-concept) stops the stage with the reasons instead of writing a shard.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from synrep.captions.backends import CaptionBackend, Query, Sampling, build_backend
from synrep.captions.clean import REASONS, CaptionFilter, first_line, normalise
from synrep.captions.templates import CAPTION_TEMPLATES, get_template, query_text
from synrep.concepts import RELATIONS, BankMixture, load_bank
from synrep.config import Config
from synrep.data.shards import MARKER_SUFFIX, SIZES_FILE
from synrep.errors import ConfigError, DataError, SynrepError
from synrep.layout import layout
from synrep.utils import (
    atomic_output,
    check_same_settings,
    derive_seed,
    ensure_writable_dir,
    remove_stale_temps,
    write_json_atomic,
)

STATS_FILE = "stats.json"
_WINDOW = 256  # candidates over which the acceptance rate is judged


class CaptionError(SynrepError):
    """A backend whose output cannot make a usable caption set."""


def marker_path(shard: Path) -> Path:
    return shard.with_name(shard.stem + MARKER_SUFFIX)


def _fingerprint(cfg: Config, section: str) -> dict[str, Any]:
    """What a shard's bytes depend on; a complete shard made with another is refused."""
    c = asdict(cfg.captions)
    rewrite = c.pop("rewrite")
    if section == "rewrites":
        return {"seed": cfg.run.seed, "rewrite": rewrite,
                **{k: c[k] for k in ("backend", "model", "max_new_tokens", "batch_size", "dtype",
                                     "min_words", "max_words", "require_concept",
                                     "demos_per_prompt", "min_accept_rate", "max_rounds")}}
    return {"seed": cfg.run.seed, **c}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    with atomic_output(path, "wb") as f:  # a temporary name unique to this process
        f.write(data)


_JSON = json.JSONEncoder(sort_keys=True, ensure_ascii=False)


def _encode_rows(rows: list[dict[str, Any]]) -> bytes:
    return "".join(_JSON.encode(r) + "\n" for r in rows).encode("utf-8")


def read_caption_shard(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL caption shard; each needs an integer ``caption_id`` and a ``caption``."""
    path = Path(path)
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"caption shard {str(path)!r} is not UTF-8 text; caption shards are "
                        "JSONL files, one JSON object per line") from None
    except OSError as e:
        raise DataError(f"cannot read caption shard {str(path)!r}: {e.strerror}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"caption shard {str(path)!r}, line {n}: not valid JSON ({e.msg}); "
                            "regenerate it or fix the line") from None
        if (not isinstance(row, dict) or not isinstance(row.get("caption"), str)
                or not isinstance(row.get("caption_id"), int)):
            raise DataError(f"caption shard {str(path)!r}, line {n}: each row must be an object "
                            "with an integer 'caption_id' and a string 'caption'")
        rows.append(row)
    return rows


def _complete_shard(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The marker of a complete shard made with ``fingerprint``; None when it must be (re)done."""
    marker = marker_path(path)
    if not (path.exists() and marker.exists()):
        return None
    try:
        info = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a marker cut short: redo the shard
    check_same_settings(info.get("config", {}), fingerprint, f"{str(path)!r} was made")
    if _sha256(path.read_bytes()) != info.get("sha256"):
        raise DataError(f"caption shard {str(path)!r} does not match its marker (edited or "
                        f"corrupted); delete it and {marker.name}, then run again to redo it")
    return info


def _check_config(cfg: Config) -> None:
    c = cfg.captions
    if c.num < 1 or c.shard_size < 1:
        raise ConfigError(f"captions.num and captions.shard_size must be >= 1, got {c.num}, "
                          f"{c.shard_size}")
    if not c.templates:
        raise ConfigError("captions.templates is empty; use some of "
                          f"{', '.join(CAPTION_TEMPLATES)}")
    for name, w in c.templates.items():
        if name not in CAPTION_TEMPLATES:
            raise ConfigError(f"captions.templates: unknown caption template {name!r}; choose "
                              f"from {', '.join(CAPTION_TEMPLATES)}")
        if not w > 0:
            raise ConfigError(f"captions.templates: weight of {name!r} must be > 0, got {w}")
    if not 0.0 < c.near_dup_threshold <= 1.0:
        raise ConfigError("captions.near_dup_threshold must be in (0, 1] (1 turns near-dup "
                          f"removal off), got {c.near_dup_threshold}")
    if c.min_words < 1 or c.max_words < c.min_words:
        raise ConfigError(f"need 1 <= captions.min_words <= captions.max_words, got "
                          f"{c.min_words}, {c.max_words}")
    if c.demos_per_prompt < 0 or c.batch_size < 1 or c.max_rounds < 1:
        raise ConfigError("captions.demos_per_prompt must be >= 0, captions.batch_size and "
                          "captions.max_rounds >= 1")
    if not 0.0 <= c.min_accept_rate < 1.0:
        raise ConfigError(f"captions.min_accept_rate must be in [0, 1), got {c.min_accept_rate}")


def _echoes(query: Query, template_cache: dict[str, set[str]]) -> set[str]:
    """Normalised texts a completion must not merely repeat: header, query, demonstrations."""
    if not query.prompt:
        return set()
    base = template_cache.get(query.template)
    if base is None:
        t = get_template(query.template)
        base = {normalise(t.header)} | {normalise(d.answer) for d in t.demos} | {
            normalise(d.query) for d in t.demos}
        template_cache[query.template] = base
    last = query.prompt.rsplit("\n", 1)[-1]
    return base | {normalise(last), normalise(query.source or "")} - {""}


class _Acceptance:
    """Stops a stage whose backend yields (almost) nothing usable, naming what went wrong."""

    def __init__(self, min_rate: float, what: str, backend: CaptionBackend) -> None:
        self.min_rate, self.what, self.backend = min_rate, what, backend
        self.tried = self.kept = 0
        self.reasons: Counter[str] = Counter()

    def update(self, tried: int, kept: int, reasons: Counter[str]) -> None:
        self.tried += tried
        self.kept += kept
        self.reasons += reasons
        if self.tried < _WINDOW:
            return
        if self.kept < self.min_rate * self.tried:
            top = ", ".join(f"{r} {n}" for r, n in self.reasons.most_common())
            hint = {
                "prompt_echo": "it repeats the prompt; use a completion (base) model or check "
                               "its tokenizer",
                "empty": "it returns nothing; check the model and captions.max_new_tokens",
                "no_concept": "its text does not name the concepts; use a stronger model or "
                              "captions.require_concept=false",
                "duplicate": "it keeps repeating itself; the banks and backend cannot make "
                             "that many distinct captions: lower captions.num or add concepts",
                "near_duplicate": "it keeps repeating itself; lower captions.num, add "
                                  "concepts or raise captions.near_dup_threshold",
            }.get(self.reasons.most_common(1)[0][0] if self.reasons else "", "check the model")
            model = f" (model {self.backend.model})" if self.backend.model else ""
            raise CaptionError(
                f"the {self.backend.name} backend{model} gave {self.kept} usable {self.what} in "
                f"the last {self.tried} tries (rejected: {top}): {hint}. Nothing was written "
                "for this shard; complete shards are kept")
        self.tried = self.kept = 0
        self.reasons = Counter()


def plan_queries(cfg: Config, mixture: BankMixture, rng, n: int, uses_prompts: bool) -> list[Query]:
    c = cfg.captions
    names = list(c.templates)
    cum, total = [], 0.0
    for w in c.templates.values():
        total += w
        cum.append(total)
    picks = mixture.sample(rng, n)
    tnames = rng.choices(names, cum_weights=cum, k=n)
    queries = []
    for (bank, concept), t in zip(picks, tnames):
        q = Query(template=t, bank=bank, concept=concept)
        if t == "c_bg":
            q.background = rng.choice(bank.backgrounds_for(concept))
        elif t == "c_rel":
            q.relation = rng.choice(RELATIONS)
            q.obj = rng.choice(bank.relation_objects)
        if uses_prompts:
            tmpl = get_template(t)
            demos = tmpl.sample_demos(rng, c.demos_per_prompt)
            q.demo_ids = [d.id for d in demos]
            q.prompt = tmpl.prompt(query_text(t, concept.name, q.background, q.relation), demos)
        queries.append(q)
    return queries


def _attributes(caption_norm: str, vocab: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """The attribute words a caption uses (the first value found for each attribute)."""
    words = set(caption_norm.split())
    return {attr: v for attr, values in vocab.items() for v in values if v in words}


class _LazyBackend:
    def __init__(self, cfg: Config) -> None:
        self.cfg, self._backend = cfg, None

    def __call__(self) -> CaptionBackend:
        if self._backend is None:
            self._backend = build_backend(self.cfg.captions, self.cfg.run.device)
        return self._backend


def _bank_specs(mixture: BankMixture, cfg: Config) -> dict[int, str]:
    return {id(b): spec for b, spec in zip(mixture.banks, cfg.captions.banks)}


def _generate_shard(cfg: Config, index: int, size: int, first_id: int, mixture: BankMixture,
                    backend: CaptionBackend, filt: CaptionFilter, accept: _Acceptance,
                    bar: tqdm) -> tuple[list[dict[str, Any]], Counter[str], int]:
    c = cfg.captions
    sampling = Sampling(c.temperature, c.top_p, c.max_new_tokens)
    cap_per_round = 20_000 if not backend.uses_prompts else max(256, 8 * c.batch_size)
    specs = _bank_specs(mixture, cfg)
    echo_cache: dict[str, set[str]] = {}
    rows: list[dict[str, Any]] = []
    filt.stats = Counter()
    tried = 0
    for rnd in range(c.max_rounds):
        need = size - len(rows)
        if need == 0:
            break
        rate = len(rows) / tried if tried else 1.0
        n = min(cap_per_round, math.ceil(need / max(rate, 0.05) * 1.05) + 8)
        seed = derive_seed(cfg.run.seed, "captions", index, rnd)
        queries = plan_queries(cfg, mixture, random.Random(seed), n, backend.uses_prompts)
        raws = backend.generate(queries, sampling, seed)
        if len(raws) != len(queries):
            raise CaptionError(f"the {backend.name} backend returned {len(raws)} completions for "
                               f"{len(queries)} prompts")
        before = Counter(filt.stats)
        kept = filt.filter(raws, [q.concept.names for q in queries],
                           [_echoes(q, echo_cache) for q in queries], need)
        processed = (kept[-1][0] + 1) if len(kept) == need else len(queries)
        tried += processed
        for i, caption, norm in kept:
            q = queries[i]
            row: dict[str, Any] = {
                "caption_id": first_id + len(rows), "caption": caption,
                "concept": q.concept.name, "concept_id": q.concept.cid,
                "bank": specs[id(q.bank)], "template": q.template, "demo_ids": q.demo_ids,
                "backend": backend.name, "model": backend.model, "seed": cfg.run.seed,
                "sampling": sampling.as_dict()}
            if q.concept.label is not None:
                row["label"] = q.concept.label
            if q.background is not None:
                row["background"] = q.background
            if q.relation is not None:
                row["relation"] = q.relation
            if q.bank.attributes:
                row["attributes"] = _attributes(norm, q.bank.attributes)
            rows.append(row)
        bar.update(len(kept))
        accept.update(processed, len(kept), filt.stats - before)
    if len(rows) < size:
        raise CaptionError(
            f"shard {index} has {len(rows)} of {size} captions after captions.max_rounds="
            f"{c.max_rounds} rounds (rejected: {dict(filt.stats)}); raise captions.max_rounds, "
            "lower captions.num, or add concepts")
    return rows, Counter(filt.stats), tried


def _summary_line(what: str, kept: int, stats: Counter[str], seconds: float, out: Path,
                  made: int) -> str:
    rejected = sum(v for r, v in stats.items() if r != "fewer_than_k")
    parts = ", ".join(f"{r} {stats[r]}" for r in (*REASONS, "fewer_than_k") if stats.get(r))
    rate = f"{made / seconds:,.0f} {what}/s" if seconds > 0 and made else "nothing to generate"
    return (f"{what}: {kept:,} kept, {rejected:,} rejected"
            f"{' (' + parts + ')' if parts else ''}; {rate} -> {out}")


def run_captions(cfg: Config) -> dict[str, Any]:
    """Write (or complete) the caption shards of ``cfg``; return the stage's stats."""
    _check_config(cfg)
    c = cfg.captions
    out = ensure_writable_dir(layout(cfg).captions, "run.dir")
    fp = _fingerprint(cfg, "captions")
    mixture = BankMixture(c.banks)
    backend = _LazyBackend(cfg)
    filt = CaptionFilter(c.min_words, c.max_words, c.require_concept, c.near_dup_threshold,
                         c.num_perm)
    n_shards = math.ceil(c.num / c.shard_size)
    total: Counter[str] = Counter()
    sizes: dict[str, int] = {}
    made = 0
    seconds = 0.0
    bar = tqdm(total=c.num, unit="cap", desc="captions", dynamic_ncols=True)
    accept = None
    try:
        for i in range(n_shards):
            size = min(c.shard_size, c.num - i * c.shard_size)
            path = out / f"captions-{i:05d}.jsonl"
            info = _complete_shard(path, fp)
            if info is not None:
                rows = read_caption_shard(path)
                filt.remember([r["caption"] for r in rows])
                total += Counter(info["rejected"])
                sizes[path.name] = len(rows)
                bar.update(len(rows))
                continue
            remove_stale_temps(path)  # a killed writer's leftovers, never a live process's
            be = backend()
            accept = accept or _Acceptance(c.min_accept_rate, "captions", be)
            t0 = time.perf_counter()
            rows, stats, tried = _generate_shard(cfg, i, size, i * c.shard_size, mixture, be,
                                                 filt, accept, bar)
            data = _encode_rows(rows)
            _write_atomic(path, data)
            dt = time.perf_counter() - t0
            seconds += dt
            made += len(rows)
            write_json_atomic(marker_path(path), {
                "rows": len(rows), "sha256": _sha256(data), "config": fp, "tried": tried,
                "rejected": dict(stats), "seconds": round(dt, 3)})
            total += stats
            sizes[path.name] = len(rows)
            bar.set_postfix(rejected=sum(total.values()))
    finally:
        bar.close()
    write_json_atomic(out / SIZES_FILE, sizes)
    summary = {"config": fp, "kept": sum(sizes.values()), "rejected": dict(total),
               "shards": len(sizes), "generated_this_run": made,
               "captions_per_s": round(made / seconds, 1) if seconds else None}
    write_json_atomic(out / STATS_FILE, summary)
    print(_summary_line("captions", summary["kept"], total, seconds, out, made))
    return summary


def _stage_complete(out: Path, fingerprint: dict[str, Any]) -> bool:
    stats = out / STATS_FILE
    if not (stats.exists() and (out / SIZES_FILE).exists()):
        return False
    if json.loads(stats.read_text()).get("config") != fingerprint:
        return False  # the stage itself reports which keys changed
    sizes = json.loads((out / SIZES_FILE).read_text())
    return all(marker_path(out / name).exists() for name in sizes)


def _check_existing(out: Path, fingerprint: dict[str, Any]) -> None:
    """Refuse, before anything is written, to add to ``out`` shards made with another config."""
    for marker in sorted(out.glob("*" + MARKER_SUFFIX)) if out.is_dir() else []:
        try:
            info = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a marker cut short: the stage redoes its shard
        shard = marker.with_name(marker.name[:-len(MARKER_SUFFIX)] + ".jsonl")
        if isinstance(info, dict):
            check_same_settings(info.get("config", {}), fingerprint,
                                f"{str(shard)!r} was made")


def check_captions(cfg: Config) -> None:
    """The captions stage's checks that need no write: its settings, and that the shards already
    in RUN/captions were made with them."""
    _check_config(cfg)
    _check_existing(layout(cfg).captions, _fingerprint(cfg, "captions"))


def check_rewrites(cfg: Config) -> None:
    """The rewrites stage's checks that need no write (see :func:`check_captions`)."""
    _check_config(cfg)
    _check_existing(layout(cfg).rewrites, _fingerprint(cfg, "rewrites"))


def captions_complete(cfg: Config) -> bool:
    return _stage_complete(layout(cfg).captions, _fingerprint(cfg, "captions"))


def rewrites_complete(cfg: Config) -> bool:
    return _stage_complete(layout(cfg).rewrites, _fingerprint(cfg, "rewrites"))


def caption_shards(directory: str | Path) -> list[Path]:
    """The complete caption shards listed in ``directory/sizes.json``, in order."""
    directory = Path(directory)
    sizes = directory / SIZES_FILE
    if not sizes.exists():
        raise DataError(f"no complete caption set in {str(directory)!r} (no {SIZES_FILE}); run "
                        "`synrep captions CONFIG` first")
    paths = [directory / name for name in sorted(json.loads(sizes.read_text()))]
    missing = [p.name for p in paths if not marker_path(p).exists()]
    if missing:
        raise DataError(f"caption shards {missing} in {str(directory)!r} are incomplete; run "
                        "`synrep captions CONFIG` again to finish them")
    return paths


def run_rewrites(cfg: Config) -> dict[str, Any]:
    """LaCLIP: write ``captions.rewrite.k`` rewrites of every caption into ``RUN/rewrites``."""
    _check_config(cfg)
    c, rc = cfg.captions, cfg.captions.rewrite
    if rc.k < 1:
        raise ConfigError(f"captions.rewrite.k must be >= 1, got {rc.k}")
    source = Path(rc.source) if rc.source else layout(cfg).captions
    shards = caption_shards(source)
    out = ensure_writable_dir(layout(cfg).rewrites, "run.dir")
    fp = _fingerprint(cfg, "rewrites")
    sampling = Sampling(rc.temperature, rc.top_p, c.max_new_tokens)
    backend = _LazyBackend(cfg)
    filt = CaptionFilter(c.min_words, c.max_words, c.require_concept, 1.0, c.num_perm)
    banks: dict[str, Any] = {}
    total: Counter[str] = Counter()
    sizes: dict[str, int] = {}
    made, seconds, accept = 0, 0.0, None
    n_rows = sum(json.loads((source / SIZES_FILE).read_text()).values())
    bar = tqdm(total=n_rows, unit="cap", desc="rewrites", dynamic_ncols=True)
    try:
        for i, src in enumerate(shards):
            path = out / f"rewrites-{i:05d}.jsonl"
            info = _complete_shard(path, fp)
            if info is not None:
                total += Counter(info["rejected"])
                sizes[path.name] = info["rows"]
                bar.update(info["rows"])
                continue
            remove_stale_temps(path)  # a killed writer's leftovers, never a live process's
            rows = read_caption_shard(src)
            be = backend()
            accept = accept or _Acceptance(c.min_accept_rate, "rewrites", be)
            t0 = time.perf_counter()
            stats = _rewrite_rows(cfg, i, rows, be, sampling, filt, accept, banks)
            data = _encode_rows(rows)
            _write_atomic(path, data)
            dt = time.perf_counter() - t0
            seconds += dt
            made += sum(len(r["rewrites"]) for r in rows)
            write_json_atomic(marker_path(path), {
                "rows": len(rows), "sha256": _sha256(data), "config": fp,
                "rejected": dict(stats), "seconds": round(dt, 3), "source": str(src)})
            total += stats
            sizes[path.name] = len(rows)
            bar.update(len(rows))
    finally:
        bar.close()
    write_json_atomic(out / SIZES_FILE, sizes)
    summary = {"config": fp, "rows": sum(sizes.values()), "rejected": dict(total),
               "rewrites_per_s": round(made / seconds, 1) if seconds else None}
    write_json_atomic(out / STATS_FILE, summary)
    print(_summary_line("rewrites", made, total, seconds, out, made))
    return summary


def read_rewrites(directory: str | Path) -> dict[int, tuple[str, list[str]]]:
    """``caption_id -> (caption, rewrites)`` of a complete rewrites set (``RUN/rewrites``)."""
    directory = Path(directory)
    if not (directory / SIZES_FILE).exists():
        raise DataError(f"no complete rewrites in {str(directory)!r} (no {SIZES_FILE}); run "
                        "`synrep rewrite CONFIG` (or add the rewrites stage to run.stages) first")
    out: dict[int, tuple[str, list[str]]] = {}
    for path in caption_shards(directory):
        for row in read_caption_shard(path):
            rewrites = row.get("rewrites")
            if not isinstance(rewrites, list) or not all(isinstance(r, str) for r in rewrites):
                raise DataError(f"{str(path)!r}: caption {row['caption_id']} has no 'rewrites' "
                                "list of strings; it is not a rewrites shard")
            out[row["caption_id"]] = (row["caption"], rewrites)
    return out


def _concept_names(row: dict[str, Any], banks: dict[str, Any]) -> tuple[str, ...] | None:
    """Names the rewrite of ``row`` must keep: its concept and synonyms, when known."""
    concept = row.get("concept")
    if not isinstance(concept, str):
        return None
    spec = row.get("bank")
    if isinstance(spec, str) and spec not in banks:
        try:
            banks[spec] = {x.cid: x for x in load_bank(spec).concepts}
        except SynrepError:
            banks[spec] = {}
    found = banks.get(spec, {}).get(row.get("concept_id")) if isinstance(spec, str) else None
    return found.names if found is not None else (concept,)


def _rewrite_rows(cfg: Config, index: int, rows: list[dict[str, Any]], backend: CaptionBackend,
                  sampling: Sampling, filt: CaptionFilter, accept: _Acceptance,
                  banks: dict[str, Any]) -> Counter[str]:
    """Fill ``row["rewrites"]`` (k distinct rewrites) for every row, in place."""
    c, k = cfg.captions, cfg.captions.rewrite.k
    tmpl = get_template("rewrite")
    echo_cache: dict[str, set[str]] = {}
    names = [_concept_names(r, banks) for r in rows]
    seen = [{normalise(r["caption"])} for r in rows]
    for r in rows:
        r["rewrites"] = []
    filt.stats = Counter()
    bank_objs = {}
    for rnd in range(c.max_rounds):
        todo = [j for j, r in enumerate(rows) for _ in range(k - len(r["rewrites"]))]
        if not todo:
            break
        seed = derive_seed(cfg.run.seed, "rewrites", index, rnd)
        rng = random.Random(seed)
        queries = []
        for j in todo:
            q = Query(template="rewrite", source=rows[j]["caption"])
            spec = rows[j].get("bank")
            if backend.uses_prompts:
                demos = tmpl.sample_demos(rng, c.demos_per_prompt)
                q.demo_ids = [d.id for d in demos]
                q.prompt = tmpl.prompt(rows[j]["caption"], demos)
            elif isinstance(spec, str):
                if spec not in bank_objs:
                    try:
                        bank_objs[spec] = load_bank(spec)
                    except SynrepError:
                        bank_objs[spec] = None
                q.bank = bank_objs[spec]
            queries.append(q)
        raws = backend.generate(queries, sampling, seed)
        before = Counter(filt.stats)
        kept = 0
        for j, q, raw in zip(todo, queries, raws):
            cap = first_line(raw)
            norm = normalise(cap)
            reason = filt.reject_reason(cap, norm, names[j], _echoes(q, echo_cache),
                                        source=rows[j]["caption"])
            if reason is None and norm in seen[j]:
                reason = "duplicate"
            if reason is None and len(rows[j]["rewrites"]) >= k:
                continue
            if reason:
                filt.stats[reason] += 1
                continue
            seen[j].add(norm)
            rows[j]["rewrites"].append(cap)
            kept += 1
        accept.update(len(queries), kept, filt.stats - before)
    for r in rows:
        r.update({"rewrite_backend": backend.name, "rewrite_model": backend.model,
                  "rewrite_seed": cfg.run.seed, "rewrite_sampling": sampling.as_dict()})
    short = sum(len(r["rewrites"]) < k for r in rows)
    stats = Counter(filt.stats)
    if short:
        stats["fewer_than_k"] = short
    return stats
