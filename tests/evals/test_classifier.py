"""The fine-tune keeps its classifier: ``OUT/model.safetensors`` with the record's provenance, reloaded with the same
logits and no encoder file needed."""
import pytest
import torch

from mimbench.data import FashionMNISTSubset
from mimbench.errors import MimbenchError
from mimbench.evals import run_eval
from mimbench.evals.classifier import MODEL_FILE, load_classifier, read_classifier_metadata, save_classifier
from mimbench.evals.finetune import build_model
from mimbench.evals.metrics import topk_accuracy
from mimbench.testing import perturb


def test_finetune_saves_a_classifier_that_reloads_with_the_same_logits(tiny_encoder, tmp_path):
    out = tmp_path / "ft"
    record = run_eval("finetune", encoder=tiny_encoder, config="eval_configs/demo/finetune_fmnist.py",
                      data="builtin:fashion-mnist", out=out,
                      overrides=["data.limit_train=64", "data.limit_val=48", "optim.batch_size=16", "runtime.amp=none"])
    model = load_classifier(out)  # the run folder; the file itself works too
    meta = model.mimbench_classifier
    assert meta["provenance"]["run_id"] == record["run_id"] and meta["provenance"]["task"] == "finetune"
    assert meta["provenance"]["encoder"]["sha256"] == record["encoder"]["sha256"]
    assert meta["classes"] == list(FashionMNISTSubset.classes) and meta["img_size"] == 32
    assert meta["data"] == "builtin:fashion-mnist" and meta["model_kwargs"]["num_classes"] == 10
    # the weights the loop ended with (its last checkpoint) give bit-identical logits
    trained = build_model(tiny_encoder, 10, img_size=32, drop_path=0.0)
    trained.load_state_dict(torch.load(out / "checkpoint-latest.pt", weights_only=True)["model"])
    val = FashionMNISTSubset("val", img_size=32)
    x = torch.stack([val[i][0] for i in range(48)])
    y = torch.tensor([val[i][1] for i in range(48)])
    with torch.no_grad():
        logits = model(x)
        assert torch.equal(logits, trained.eval()(x))
    assert topk_accuracy(logits, y, ks=(1,))[1] == pytest.approx(record["metrics"]["top1"])


def test_a_saved_classifier_needs_no_encoder_file(tiny_encoder, tmp_path):
    model = perturb(build_model(tiny_encoder, 7, img_size=32, drop_path=0.0))
    record = {"run_id": "ab" * 16, "task": "finetune", "protocol": {"name": "p"}, "metrics": {"top1": 1.0}}
    path = save_classifier(model, tmp_path / MODEL_FILE, record=record, encoder_metadata=model.mimbench_metadata,
                           model_kwargs={"global_pool": "avg", "fc_norm": True, "num_classes": 7}, img_size=32,
                           classes=[f"c{i}" for i in range(7)], mean=(0.5,) * 3, std=(0.25,) * 3, data="d",
                           eval_transform="none")
    loaded = load_classifier(path)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert read_classifier_metadata(tmp_path)["provenance"]["protocol"] == {"name": "p"}


def test_an_encoder_file_or_an_empty_folder_is_not_a_classifier(tiny_encoder, tmp_path):
    with pytest.raises(MimbenchError, match="not a fine-tuned classifier file"):
        load_classifier(tiny_encoder)
    with pytest.raises(MimbenchError, match="No fine-tuned model"):
        load_classifier(tmp_path)
