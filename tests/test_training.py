"""Training-loop pieces and the recording pass, against direct computations."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rayprune.robust import AttackConfig, build_model
from rayprune.robust.loop import ATConfig, BatchStream, IndexedBatches, train_steps
from rayprune.robust.recording import compute_embeddings, record_predictions
from rayprune.robust.training import augment, learning_rate, make_optimizer, to_float_images


def test_batch_stream_passes_are_permutations_and_resume_exactly():
    stream = BatchStream(10, 4, seed=1)
    drawn = np.concatenate([stream.next() for _ in range(5)])  # 20 = two full passes
    assert sorted(drawn[:10]) == list(range(10)) and sorted(drawn[10:]) == list(range(10))
    assert not np.array_equal(drawn[:10], drawn[10:])  # each pass reshuffled
    a = BatchStream(10, 3, seed=2)
    [a.next() for _ in range(4)]
    b = BatchStream(10, 3, seed=2, **a.state())
    for _ in range(5):
        np.testing.assert_array_equal(a.next(), b.next())


def test_cosine_schedule_matches_formula():
    total, warm, base = 100, 10, 0.2
    assert learning_rate(0, total, base, "cosine", warm) == pytest.approx(base / warm)
    assert learning_rate(9, total, base, "cosine", warm) == pytest.approx(base)
    for step in (10, 37, 99):
        expected = base * 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm)))
        assert learning_rate(step, total, base, "cosine", warm) == pytest.approx(expected)
    assert learning_rate(50, total, base, "constant") == base
    with pytest.raises(ValueError, match="unknown schedule"):
        learning_rate(0, 10, 0.1, "linear")


def test_optimizer_decays_weights_only():
    model = build_model("small_cnn", num_classes=3, width=4)
    opt = make_optimizer(model, lr=0.1, weight_decay=5e-4)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.ndim > 1), name
    assert opt.param_groups[1]["weight_decay"] == 0.0


def test_augment_is_a_crop_of_the_padded_image_or_its_mirror():
    torch.manual_seed(0)
    x = torch.rand(16, 3, 8, 8)
    out = augment(x, padding=2, generator=torch.Generator().manual_seed(5))
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(16):
        crops = [padded[i, :, dy : dy + 8, dx : dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(2)) for c in crops)
    assert torch.equal(augment(x, padding=0, flip=False), x)


def test_to_float_images_layout():
    raw = np.arange(2 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 4, 5, 3)
    t = to_float_images(raw)
    assert t.shape == (2, 3, 4, 5)
    assert t[1, 2, 3, 4].item() == pytest.approx(raw[1, 3, 4, 2] / 255)
    with pytest.raises(ValueError, match="uint8"):
        to_float_images(raw.astype(np.float32))


@pytest.fixture(scope="module")
def tiny_task():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (96,), generator=g)
    centres = torch.randn(3, 3 * 8 * 8, generator=g)
    x = (0.5 + 0.3 * (torch.nn.functional.one_hot(y, 3).float() @ centres).view(-1, 3, 8, 8))
    return x.clamp(0, 1), y


def test_training_reduces_loss_and_recording_matches_direct_computation(tiny_task):
    x, y = tiny_task
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=3, width=8)
    opt = make_optimizer(model, lr=0.05)
    attack = AttackConfig("linf", 2 / 255, 1 / 255, 2)
    recipe = ATConfig(lr=0.05, schedule="constant", augment=False)
    batches = IndexedBatches(x, y, BatchStream(len(x), 32, seed=0))
    first = train_steps(model, opt, batches, attack, recipe, steps=3, first_step=0, total_steps=40)
    for i in range(1, 8):
        last = train_steps(model, opt, batches, attack, recipe, steps=5, first_step=3 + 5 * i, total_steps=40)
    assert last["loss"] < first["loss"]

    model.train()
    record = record_predictions(model, x, y, attack, batch_size=40, generator=torch.Generator().manual_seed(1))
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        probs = F.softmax(model(x), dim=1)
    p_true = probs[torch.arange(len(y)), y]
    others = probs.clone()
    others[torch.arange(len(y)), y] = -1
    np.testing.assert_allclose(record.p_clean, p_true.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(record.margin_clean, (p_true - others.max(dim=1).values).numpy(), atol=1e-6)
    err = (probs - F.one_hot(y, 3)).norm(dim=1)
    np.testing.assert_allclose(record.l2_error_clean, err.numpy(), rtol=1e-5, atol=1e-6)
    assert record.p_adv.mean() < record.p_clean.mean()  # the attack lowers true-class probability
    np.testing.assert_allclose(compute_embeddings(model, x, batch_size=7), model.embed(x).detach().numpy(),
                               rtol=1e-5, atol=1e-6)
    # Keeping the embeddings (the scoring run's last epoch) changes no statistic, not one
    # bit (the scores come from them), and gives what the embedding pass gives.
    model.train()
    with_emb = record_predictions(model, x, y, attack, batch_size=40, generator=torch.Generator().manual_seed(1),
                                  with_embeddings=True)
    assert model.training and record.embedding is None
    for field in ("p_clean", "p_adv", "margin_clean", "margin_adv", "l2_error_clean", "l2_error_adv"):
        np.testing.assert_array_equal(getattr(with_emb, field), getattr(record, field))
    assert with_emb.embedding.shape == (len(x), model.embedding_dim) and with_emb.embedding.dtype == np.float32
    np.testing.assert_allclose(with_emb.embedding, compute_embeddings(model, x, batch_size=7), rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="EmbeddingClassifier"):
        record_predictions(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(x[0].numel(), 3)), x, y, attack,
                           with_embeddings=True)


def test_worker_rows_decoded_in_chunks_equal_the_rows_decoded_by_hand(tmp_path):
    """A training worker's float images, decoded a few rows at a time straight into one
    tensor, equal each requested row's bytes read with pyarrow and converted by hand, in
    the order the ids were asked for (across files, unsorted, a last chunk that is short)."""
    import pyarrow.dataset as pads

    from rayprune.data.demo_pool import DemoPoolSpec
    from rayprune.data.pool import pool_files, write_demo_pool
    from rayprune.stages.training import load_float_rows, load_rows

    info = write_demo_pool(DemoPoolSpec(n_real=40, n_synthetic=160, image_size=8, num_classes=3), tmp_path / "pool",
                           rows_per_file=64)
    files = pool_files(tmp_path / "pool", info)
    assert len(files) > 1
    ids = np.random.default_rng(0).permutation(200)[:77]
    got_ids, images, labels, sources = load_float_rows(files, ids, (8, 8, 3), batch_rows=10)

    table = pads.dataset(files, format="parquet").to_table().sort_by("id")  # row i holds id i
    rows = [table.slice(int(i), 1).to_pylist()[0] for i in ids]
    want = np.stack([np.frombuffer(r["image"], np.uint8).reshape(8, 8, 3).transpose(2, 0, 1) for r in rows]) / 255.0
    np.testing.assert_array_equal(got_ids, ids)
    assert images.dtype == torch.float32 and images.is_contiguous() and tuple(images.shape) == (77, 3, 8, 8)
    np.testing.assert_allclose(images.numpy(), want, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(labels, [r["label"] for r in rows])
    assert list(sources) == [r["source"] for r in rows]
    want_u8 = np.stack([np.frombuffer(r["image"], np.uint8).reshape(8, 8, 3) for r in rows])
    np.testing.assert_array_equal(load_rows(files, ids, (8, 8, 3), batch_rows=7)[1], want_u8)
    with pytest.raises(RuntimeError, match="lack 2 of this shard's ids"):
        load_float_rows(files, np.array([5, 999, 3, 1000]), (8, 8, 3))

    # Files of many row groups, a few of which hold the wanted rows (the others are
    # skipped after their id column), read from a directory in batches smaller than a group.
    import pyarrow.parquet as pq

    regrouped = tmp_path / "regrouped"
    regrouped.mkdir()
    pq.write_table(table.slice(0, 120), regrouped / "a.parquet", row_group_size=16)
    pq.write_table(table.slice(120), regrouped / "b.parquet", row_group_size=16)
    few = np.array([130, 3, 47, 199, 17, 18])
    got = load_rows(regrouped, few, (8, 8, 3), batch_rows=5)
    rows = [table.slice(int(i), 1).to_pylist()[0] for i in few]
    want_few = np.stack([np.frombuffer(r["image"], np.uint8).reshape(8, 8, 3) for r in rows])
    np.testing.assert_array_equal(got[1], want_few)
    np.testing.assert_array_equal(got[2], [r["label"] for r in rows])
    every = load_rows(regrouped, np.arange(200)[::-1], (8, 8, 3), batch_rows=5)  # whole batches wanted
    np.testing.assert_array_equal(every[1][::-1], np.stack(
        [np.frombuffer(b, np.uint8).reshape(8, 8, 3) for b in table.column("image").to_pylist()]))


def _share_buffers_on_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from rayprune.stages.training import share_rank0_buffers

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # the same parameters on every rank, as DDP keeps them
        model = build_model("small_cnn", num_classes=3, width=8)
        with torch.no_grad():
            for i, buffer in enumerate(model.buffers()):  # rank-local statistics, as after a DDP step
                buffer.fill_(10 * rank + i) if buffer.is_floating_point() else buffer.fill_(rank + 1)
        share_rank0_buffers(model, world)
        torch.save({"buffers": [b.clone() for b in model.buffers()],
                    "params": [p.detach().clone() for p in model.parameters()]}, f"{out_dir}/rank_{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_every_rank_gets_rank_0s_batch_norm_statistics(tmp_path):
    """Two gloo processes with different buffers: afterwards both hold rank 0's (the
    values rank 0 set, integer counters included), and no parameter moved."""
    import torch.multiprocessing as mp

    mp.spawn(_share_buffers_on_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    zero, one = (torch.load(tmp_path / f"rank_{r}.pt", weights_only=True) for r in (0, 1))
    assert len(zero["buffers"]) >= 3  # small_cnn has batch norm: running mean, var and count
    for i, (a, b) in enumerate(zip(zero["buffers"], one["buffers"])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        expected = float(i) if a.is_floating_point() else 1.0  # what rank 0 wrote
        assert torch.all(a == expected), (i, a)
    for a, b in zip(zero["params"], one["params"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    from rayprune.stages.training import share_rank0_buffers

    model = build_model("small_cnn", num_classes=3, width=8)
    before = [b.clone() for b in model.buffers()]
    share_rank0_buffers(model, 1)  # one worker: nothing to share, no process group needed
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))
