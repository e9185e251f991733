from megatron_taskmoe.training.metrics import MetricsWriter, read_metrics


def test_jsonl_and_tensorboard(tmp_path):
    w = MetricsWriter(tmp_path)
    w.write("train", 1, loss=2.5, lr=1e-3, tokens_per_s=100.0)
    w.write("eval", 2, bleu={"de-en": 10.0, "en-de": 8.0}, bleu_avg=9.0)
    w.close()
    recs = read_metrics(tmp_path)
    assert [r["kind"] for r in recs] == ["train", "eval"]
    assert recs[0]["loss"] == 2.5 and recs[1]["bleu"]["de-en"] == 10.0
    assert read_metrics(tmp_path, "eval")[0]["step"] == 2
    assert any((tmp_path / "tensorboard").iterdir())


def test_disabled_writer_writes_nothing(tmp_path):
    w = MetricsWriter(tmp_path / "run", enabled=False)
    w.write("train", 1, loss=1.0)
    w.close()
    assert not (tmp_path / "run").exists()
