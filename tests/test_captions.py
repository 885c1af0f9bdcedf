"""The captions stage: templates, cleaning, MinHash dedup, backends, determinism, resume, errors."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

from synrep.captions.backends import BACKENDS, CaptionBackend, Query, Sampling
from synrep.captions.clean import CaptionFilter, first_line, mentions, normalise
from synrep.captions.grammar import GrammarBackend, compose, paraphrase
from synrep.captions.minhash import NearDuplicateIndex, shingle_hashes
from synrep.captions.stage import read_caption_shard, run_captions, run_rewrites
from synrep.captions.templates import CAPTION_TEMPLATES, get_template
from synrep.cli import main
from synrep.concepts import RELATIONS, load_bank
from synrep.config import load_config
from synrep.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "captions_fashion.yaml")


class _EchoBackend(CaptionBackend):
    """Fails like a chat model given a completion prompt: it repeats the prompt."""

    name, model = "test-echo", "echo"

    def __init__(self, cfg, device="cpu"):
        pass

    def generate(self, queries, sampling, seed):
        return [q.prompt for q in queries]


class _EmptyBackend(_EchoBackend):
    """Fails like a model that emits end-of-text at once."""

    name, model = "test-empty", "empty"

    def generate(self, queries, sampling, seed):
        return ["" for _ in queries]


for _cls in (_EchoBackend, _EmptyBackend):
    if _cls.name not in BACKENDS:
        BACKENDS.register(_cls.name)(_cls)


def _cfg(tmp_path: Path, *overrides: str, name: str = "run"):
    return load_config(CONFIG, [f"run.dir={tmp_path / name}", *overrides])


def _shard_bytes(run_dir: Path, sub: str = "captions") -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run_dir / sub).iterdir())
            if p.suffix == ".jsonl"}


# -- templates -----------------------------------------------------------------------------


def test_templates_have_enough_original_demonstrations():
    ids = set()
    for name in CAPTION_TEMPLATES:
        t = get_template(name)
        assert len(t.demos) >= 50
        assert len({d.answer for d in t.demos}) == len(t.demos)
        for d in t.demos:
            concept = d.query.split(",")[0]
            assert concept in d.answer and "=>" not in d.answer and "\n" not in d.answer
            ids.add(d.id)
        if name == "c_rel":
            rels = [d.query.split(", ", 1)[1] for d in t.demos]
            assert set(rels) == set(RELATIONS)
            assert all(f" {r} " in f" {d.answer} " for r, d in zip(rels, t.demos))
    assert len(get_template("rewrite").demos) >= 20
    assert len(ids) == sum(len(get_template(n).demos) for n in CAPTION_TEMPLATES)


def test_prompt_is_header_three_demos_query_last():
    t = get_template("c_rel")
    demos = t.sample_demos(random.Random(0), 3)
    prompt = t.prompt("ankle boot, next to", demos)
    lines = prompt.split("\n")
    assert lines[0] == t.header and len(lines) == 5
    assert [ln.split(" => ")[1] for ln in lines[1:4]] == [d.answer for d in demos]
    assert lines[-1] == "ankle boot, next to =>"
    with pytest.raises(ConfigError, match="unknown caption template 'c_scene'"):
        get_template("c_scene")


# -- cleaning and dedup ----------------------------------------------------------------------


def test_first_line_normalise_mentions():
    assert first_line("  a red coat  on\ta hanger\nsecond line") == "a red coat on a hanger"
    assert first_line("\na red coat") == ""
    assert normalise("A Red-ish COAT,  on: a hanger!") == "a red-ish coat on a hanger"
    assert mentions("two sneakers on a shelf", ["sneaker"])
    assert mentions("a pair of slacks", ["trousers", "slacks"])
    assert not mentions("a dark t-shirt", ["shirt"])  # whole words only
    assert not mentions("a bagel on a plate", ["bag"])


def test_filter_counts_each_reason():
    f = CaptionFilter(3, 24, True, 0.9, 64)
    long = "a grey coat with deep pockets hanging on a brass hook by the front door of a house"
    raws = ["", "tabby cat => a cat", "a coat", "a grey coat " + "word " * 30,
            "a grey scarf on a hook", long, long.upper() + "!", f"the {long}",
            "a dark wool coat hanging by the door"]
    names = [("coat", "jacket")] * len(raws)
    echoes = [set()] * len(raws)
    kept = f.filter(raws, names, echoes, limit=10)
    assert [k[1] for k in kept] == [long, "a dark wool coat hanging by the door"]
    assert dict(f.stats) == {"empty": 1, "prompt_echo": 1, "too_short": 1, "too_long": 1,
                             "no_concept": 1, "duplicate": 1, "near_duplicate": 1}


def test_minhash_estimates_jaccard():
    rng = random.Random(0)
    vocab = [f"w{i:03d}" for i in range(400)]
    index = NearDuplicateIndex(0.5, num_perm=256, shingle=4)
    errs = []
    for _ in range(60):
        a = set(rng.sample(vocab, 30))
        b = set(rng.sample(sorted(a), rng.randint(5, 30))) | set(rng.sample(vocab, 10))
        # one word per shingle: the shingle sets are the word sets
        sa, sb = index.signatures([" ".join(sorted(a)), " ".join(sorted(b))])
        exact = len(a & b) / len(a | b)
        errs.append(abs(np.mean(sa == sb) - exact))
    # standard error of the estimate at 256 permutations is <= 0.031
    assert np.mean(errs) < 0.035 and max(errs) < 0.12


def test_near_duplicates_match_brute_force():
    rng = random.Random(1)
    words = [f"tok{i}" for i in range(60)]
    base = [rng.sample(words, 20) for _ in range(40)]
    texts = []
    for b in base:
        texts.append(" ".join(b))
        texts.append(" ".join(b[:19] + [rng.choice(words)]))  # near copy (one word changed)
    rng.shuffle(texts)

    def shingles(t):  # the index's own shingle sets, compared exactly
        return set(shingle_hashes([t], 9)[0].tolist())

    index = NearDuplicateIndex(0.8, num_perm=128, shingle=9)
    new = index.add_texts(texts)
    for j, t in enumerate(texts):
        best = max((len(shingles(t) & shingles(u)) / len(shingles(t) | shingles(u))
                    for u in texts[:j]), default=0.0)
        if best >= 0.9:
            assert not new[j], t  # clear near-duplicates are dropped
        if best <= 0.3:
            assert new[j], t  # clearly different texts are kept


# -- grammar ----------------------------------------------------------------------------------


def test_grammar_is_deterministic_and_follows_the_query():
    bank = load_bank("fashion")
    backend = GrammarBackend()
    rng = random.Random(0)
    queries = []
    for _ in range(300):
        c = rng.choice(bank.concepts)
        t = rng.choice(CAPTION_TEMPLATES)
        queries.append(Query(template=t, bank=bank, concept=c,
                             background=rng.choice(bank.backgrounds) if t == "c_bg" else None,
                             relation=rng.choice(RELATIONS) if t == "c_rel" else None,
                             obj=rng.choice(bank.relation_objects) if t == "c_rel" else None))
    s = Sampling(0.8, 0.9, 100)
    a, b = backend.generate(queries, s, 7), backend.generate(queries, s, 7)
    assert a == b and a != backend.generate(queries, s, 8)
    for q, text in zip(queries, a):
        assert mentions(normalise(text), q.concept.names)
        if q.template == "c_bg":
            assert q.background in text
        if q.template == "c_rel":
            assert f" {q.relation} " in f" {text} " and q.obj in text


def test_compose_with_fixed_attributes():
    bank = load_bank("fashion")
    coat = bank.concepts[4]
    for seed in range(50):
        text = compose(bank, coat, "c", random.Random(seed),
                       attributes={"tone": "dark", "texture": "plain"})
        words = set(normalise(text).split())
        assert {"dark", "plain"} <= words
        assert not words & {"grey", "light", "textured", "patterned", "slim", "wide"}
    assert compose(bank, bank.concepts[1], "c", random.Random(0)).count("pair of") == 1


def test_paraphrase_changes_words_not_the_concept():
    rng = random.Random(0)
    text = "a product photo of a dark plain coat next to a wooden hanger, laid flat"
    outs = {paraphrase(text, rng) for _ in range(30)}
    assert len(outs) > 5
    for o in outs:
        assert "dark plain coat" in o


# -- the stage --------------------------------------------------------------------------------


def test_stage_rows_have_provenance_and_are_byte_identical(tmp_path):
    over = ["captions.num=3000", "captions.shard_size=1000"]
    s1 = run_captions(_cfg(tmp_path, *over, name="a"))
    run_captions(_cfg(tmp_path, *over, name="b"))
    a, b = _shard_bytes(tmp_path / "a"), _shard_bytes(tmp_path / "b")
    assert list(a) == ["captions-00000.jsonl", "captions-00001.jsonl", "captions-00002.jsonl"]
    assert a == b
    run_captions(_cfg(tmp_path, *over, "run.seed=1", name="c"))
    assert _shard_bytes(tmp_path / "c") != a
    rows = [r for n in a for r in read_caption_shard(tmp_path / "a" / "captions" / n)]
    assert [r["caption_id"] for r in rows] == list(range(3000))
    assert len({normalise(r["caption"]) for r in rows}) == 3000
    bank = load_bank("fashion")
    for r in rows:
        assert {"caption_id", "caption", "concept", "template", "demo_ids", "backend", "model",
                "seed", "sampling", "label", "bank", "attributes"} <= set(r)
        assert r["backend"] == "grammar" and r["seed"] == 0 and r["bank"] == "fashion"
        assert bank.concepts[r["label"]].name == r["concept"]
        assert r["sampling"] == {"temperature": 0.8, "top_p": 0.9, "max_new_tokens": 100}
        words = set(normalise(r["caption"]).split())
        assert all(v in words for v in r["attributes"].values())
    templates = {r["template"] for r in rows}
    assert templates == {"c", "c_bg", "c_rel"}
    assert s1["kept"] == 3000 and sizes(tmp_path / "a") == {n: 1000 for n in a}


def sizes(run_dir: Path) -> dict[str, int]:
    return json.loads((run_dir / "captions" / "sizes.json").read_text())


def test_partial_shards_are_redone(tmp_path):
    over = ["captions.num=3000", "captions.shard_size=1000"]
    run_captions(_cfg(tmp_path, *over, name="ref"))
    cfg = _cfg(tmp_path, *over)
    run_captions(cfg)
    out = tmp_path / "run" / "captions"
    # a killed run: shard 1 written but not marked, shard 2 half-written under its temp name
    (out / "captions-00001_stats.json").unlink()
    (out / "captions-00001.jsonl").write_text('{"caption_id": 1000, "caption": "cut')
    (out / "captions-00002.jsonl").rename(out / "captions-00002.jsonl.tmp")
    (out / "captions-00002_stats.json").unlink()
    (out / "sizes.json").unlink()
    (out / "stats.json").unlink()
    summary = run_captions(cfg)
    assert summary["generated_this_run"] == 2000
    assert _shard_bytes(tmp_path / "run") == _shard_bytes(tmp_path / "ref")
    assert not list(out.glob("*.tmp"))


@pytest.mark.slow
def test_killed_run_resumes_to_identical_bytes(tmp_path):
    over = ["captions.num=60000", "captions.shard_size=5000"]
    run_captions(_cfg(tmp_path, *over, name="ref"))
    cmd = [sys.executable, "-m", "synrep", "captions", CONFIG, f"run.dir={tmp_path / 'run'}",
           *over]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = tmp_path / "run" / "captions"
    deadline = time.time() + 120
    while not (out / "captions-00002_stats.json").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before the kill"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "sizes.json").exists()  # nothing that looks complete
    assert main(["captions", CONFIG, f"run.dir={tmp_path / 'run'}", *over]) == 0
    assert _shard_bytes(tmp_path / "run") == _shard_bytes(tmp_path / "ref")


def test_cli_captions_and_run_stage_skip(tmp_path, capsys):
    args = [CONFIG, f"run.dir={tmp_path / 'run'}", "captions.num=500", "captions.shard_size=250"]
    assert main(["captions", *args]) == 0
    assert "captions: 500 kept" in capsys.readouterr().out
    assert main(["run", *args, "run.stages=[captions]"]) == 0
    assert "[captions] complete, skipped" in capsys.readouterr().out
    # a changed config on the same run directory is refused, naming the key
    assert main(["captions", *args, "captions.templates={c: 1.0}"]) == 2
    assert "changed: templates" in capsys.readouterr().err


# -- bad input: one clear error, nothing that looks complete ----------------------------------


def _fails(tmp_path, capsys, *overrides: str, match: str) -> None:
    run = tmp_path / "bad"
    code = main(["captions", CONFIG, f"run.dir={run}", "captions.num=300",
                 "captions.shard_size=100", *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    errors = [ln for ln in err.splitlines() if ln.startswith("synrep: error:")]
    assert len(errors) == 1 and match in errors[0], err
    out = run / "captions"
    assert not list(out.glob("*.jsonl")) if out.exists() else True
    assert not (out / "sizes.json").exists() and not (out / "stats.json").exists()


def test_error_empty_concept_bank(tmp_path, capsys):
    bank = tmp_path / "empty.yaml"
    bank.write_text("concepts: []\n")
    _fails(tmp_path, capsys, f"captions.banks={{{bank}: 1.0}}", match="has no concepts")


def test_error_malformed_bank_file(tmp_path, capsys):
    bank = tmp_path / "broken.yaml"
    bank.write_text("concepts: [robin, {name: jay\n")
    _fails(tmp_path, capsys, f"captions.banks={{{bank}: 1.0}}", match="is not valid YAML")


def test_error_unknown_template(tmp_path, capsys):
    _fails(tmp_path, capsys, "captions.templates={c: 0.5, c_scene: 0.5}",
           match="unknown caption template 'c_scene'")


def test_error_backend_returns_nothing(tmp_path, capsys):
    _fails(tmp_path, capsys, "captions.backend=test-empty",
           match="gave 0 usable captions in the last")


def test_error_backend_repeats_the_prompt(tmp_path, capsys):
    _fails(tmp_path, capsys, "captions.backend=test-echo", match="(rejected: prompt_echo")


def test_error_missing_language_model(tmp_path, capsys):
    _fails(tmp_path, capsys, "captions.backend=transformers",
           f"captions.model={tmp_path / 'no-such-model'}", match="does not exist")


def test_error_malformed_caption_shard_for_rewrites(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "captions-00000.jsonl").write_text('{"caption_id": 0, "caption": "a coat"}\nnot json\n')
    (src / "captions-00000_stats.json").write_text("{}")
    (src / "sizes.json").write_text('{"captions-00000.jsonl": 2}')
    cfg = _cfg(tmp_path, f"captions.rewrite.source={src}")
    with pytest.raises(DataError, match="line 2: not valid JSON"):
        run_rewrites(cfg)


# -- LaCLIP rewrites --------------------------------------------------------------------------


def test_grammar_rewrites(tmp_path):
    cfg = _cfg(tmp_path, "captions.num=400", "captions.shard_size=200", "captions.rewrite.k=3")
    run_captions(cfg)
    run_rewrites(cfg)
    out = tmp_path / "run" / "rewrites"
    rows = [r for p in sorted(out.glob("*.jsonl")) for r in read_caption_shard(p)]
    assert [r["caption_id"] for r in rows] == list(range(400))
    bank = load_bank("fashion")
    full = 0
    for r in rows:
        assert len(r["rewrites"]) <= 3
        full += len(r["rewrites"]) == 3
        norms = {normalise(x) for x in r["rewrites"]}
        assert len(norms) == len(r["rewrites"]) and normalise(r["caption"]) not in norms
        names = bank.concepts[r["label"]].names
        assert all(mentions(n, names) for n in norms)
        assert r["rewrite_backend"] == "grammar"
    assert full / len(rows) > 0.9
    first = _shard_bytes(tmp_path / "run", "rewrites")
    for p in out.iterdir():
        p.unlink()
    run_rewrites(cfg)
    assert _shard_bytes(tmp_path / "run", "rewrites") == first


# -- the transformers backend on a tiny random model built here -------------------------------


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    from synrep.testing import build_tiny_lm

    return build_tiny_lm(tmp_path_factory.mktemp("lm") / "tiny-gpt2")


def test_transformers_backend_end_to_end(tmp_path, tiny_lm):
    # a random model writes noise, so the content checks are relaxed; the code path is real
    over = [f"captions.model={tiny_lm}", "captions.backend=transformers", "captions.num=24",
            "captions.shard_size=12", "captions.require_concept=false", "captions.min_words=1",
            "captions.max_new_tokens=12", "captions.batch_size=8", "captions.min_accept_rate=0"]
    run_captions(_cfg(tmp_path, *over, name="a"))
    run_captions(_cfg(tmp_path, *over, name="b"))
    a = _shard_bytes(tmp_path / "a")
    assert a == _shard_bytes(tmp_path / "b")
    rows = [r for n in a for r in read_caption_shard(tmp_path / "a" / "captions" / n)]
    assert len(rows) == 24
    for r in rows:
        assert r["backend"] == "transformers" and r["model"] == str(tiny_lm)
        assert len(r["demo_ids"]) == 3 and r["caption"] and "\n" not in r["caption"]
        assert r["sampling"] == {"temperature": 0.8, "top_p": 0.9, "max_new_tokens": 12}


def test_transformers_backend_pads_left_and_stops_at_newline(tiny_lm):
    from synrep.captions.hf import TransformersBackend

    cfg = load_config(CONFIG, ["captions.backend=transformers", f"captions.model={tiny_lm}",
                               "captions.batch_size=4"]).captions
    backend = TransformersBackend(cfg)
    assert backend.tokenizer.padding_side == "left"
    t = get_template("c")
    demos = t.demos[:3]
    queries = [Query("c", prompt=t.prompt(c, list(demos))) for c in
               ["coat", "a very long concept name for padding", "bag", "ankle boot", "dress"]]
    s = Sampling(0.8, 0.9, 16)
    out = backend.generate(queries, s, seed=3)
    assert len(out) == 5 and out == backend.generate(queries, s, seed=3)
    assert all("\n" not in o.rstrip("\n") for o in out)
    # left padding: a prompt's completion does not depend on what it is batched with
    greedy = Sampling(1e-6, 1.0, 8)  # near-greedy, so the batch's random draws do not matter
    alone = backend.generate(queries[:1], greedy, seed=0)
    batched = backend.generate(queries[:2], greedy, seed=0)
    assert batched[0] == alone[0]


def test_transformers_rewrites_on_tiny_model(tmp_path, tiny_lm):
    cfg = _cfg(tmp_path, "captions.num=6", "captions.shard_size=6")
    run_captions(cfg)
    cfg = _cfg(tmp_path, "captions.num=6", "captions.shard_size=6",
               "captions.backend=transformers", f"captions.model={tiny_lm}",
               "captions.require_concept=false", "captions.min_words=1",
               "captions.max_new_tokens=10", "captions.min_accept_rate=0",
               "captions.max_rounds=2", "captions.rewrite.k=2",
               f"captions.rewrite.source={tmp_path / 'run' / 'captions'}")
    cfg.run.dir = str(tmp_path / "rw")
    run_rewrites(cfg)
    rows = read_caption_shard(tmp_path / "rw" / "rewrites" / "rewrites-00000.jsonl")
    assert len(rows) == 6 and all(r["rewrite_model"] == str(tiny_lm) for r in rows)
    assert all(1 <= len(r["rewrites"]) <= 2 for r in rows)


def test_caption_combinations_are_diverse():
    # exact duplicates among raw grammar captions stay rare (benchmarks/captions.py: 100k)
    cfg_rows = GrammarBackend()
    bank = load_bank("fashion")
    rng = random.Random(0)
    qs = [Query("c", bank=bank, concept=rng.choice(bank.concepts)) for _ in range(5000)]
    texts = cfg_rows.generate(qs, Sampling(0.8, 0.9, 100), 0)
    assert len(set(texts)) / len(texts) > 0.97
    assert not any(a == b for a, b in combinations(texts[:50], 2))
