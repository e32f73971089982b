"""wandb: a recipe run with wandb_log=True under WANDB_MODE=offline writes a run that we read back
(config, scalars, the visualisation image); without wandb_log nothing is written and no login is needed."""
import glob
import json
import os
import struct
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OCR_TINY = ["--image_size=32", "--sam_dim=16", "--sam_window=4", "--neck_dim=8", "--clip_layers=1", "--n_layer=1",
            "--n_embd=32", "--n_head=2", "--n_kv_head=2", "--batch_size=4", "--n_eval=4", "--eval_batch=4",
            "--log_interval=2", "--max_text_tokens=16", "--bench_tokens=4", "--max_lines=1", "--font_sizes=(10,)",
            "--max_train_seconds=0", "--max_steps=2", "--eval_interval=2"]


def wandb_records(path):
    """The protobuf records of an offline run file (LevelDB-style log: 32 KiB blocks of
    [crc32 4 | length 2 | type 1 | data] chunks after a 7-byte ':W&B' header)."""
    from wandb.proto import wandb_internal_pb2 as pb
    raw = open(path, "rb").read()
    assert raw[:4] == b":W&B", raw[:8]
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        buf = data if kind in (1, 2) else buf + data  # FULL/FIRST start a record, MIDDLE/LAST continue it
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def flat(items):
    return {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in items}


def run_ocr(out, wandb_log, extra_env):
    env = dict(os.environ, WANDB_SILENT="true", **extra_env)
    r = subprocess.run([sys.executable, "train_ocr.py", *OCR_TINY, f"--wandb_log={wandb_log}", "--out_dir=" + out],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def test_recipe_logs_to_offline_wandb_and_reads_back(tmp_path):
    out = str(tmp_path / "run")
    run_ocr(out, True, dict(WANDB_MODE="offline"))
    files = glob.glob(os.path.join(out, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(files) == 1, os.listdir(out)
    config, history = {}, []
    for rec in wandb_records(files[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            config.update(flat(rec.run.config.update))
        elif kind == "history":
            history.append(flat(rec.history.item))
    assert config["max_steps"] == 2 and config["n_embd"] == 32       # the run's config
    assert any("loss" in h or "train/loss" in h for h in history)    # scalars
    images = [k for h in history for k, v in h.items() if k.endswith("/_type") and v == "image-file"]
    assert images, history                                           # the visualisation
    media = glob.glob(os.path.join(out, "wandb", "offline-run-*", "files", "media", "images", "*.png"))
    assert media


def test_no_wandb_without_asking_even_if_login_is_broken(tmp_path):
    out = str(tmp_path / "run")
    # an unusable wandb setup must not matter to a run that did not ask for wandb
    run_ocr(out, False, dict(WANDB_MODE="online", WANDB_API_KEY="invalid", WANDB_BASE_URL="http://127.0.0.1:9"))
    assert not os.path.exists(os.path.join(out, "wandb"))
    assert os.path.exists(os.path.join(out, "results.json"))
