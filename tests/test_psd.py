"""CPSD sub-tasks, label merging rho (Eq. 5), KD loss (Eq. 6), student step (Eq. 7), teachers and a tiny study."""

from __future__ import annotations

import copy
import dataclasses
import os

import numpy as np
import pytest
import torch

from mlic_lib import psd
from mlic_lib.losses import AsymmetricLoss

SUBSETS = [np.array([4, 0]), np.array([1, 3, 5]), np.array([2])]


def test_rho_inverts_the_subset_split_exactly():
    logits = torch.randn(7, 6)
    parts = psd.split_logits(logits, SUBSETS)
    assert [p.shape[1] for p in parts] == [2, 3, 1]
    assert torch.equal(parts[0][:, 0], logits[:, 4])
    assert torch.equal(psd.merge_logits(parts, SUBSETS), logits)
    # reference: scatter by hand
    ref = torch.zeros(7, 6)
    for p, s in zip(parts, SUBSETS, strict=True):
        for j, c in enumerate(s):
            ref[:, c] = p[:, j]
    assert torch.equal(psd.merge_logits(parts, SUBSETS, 6), ref)


def test_rho_is_differentiable_and_checks_inputs():
    parts = [torch.randn(3, len(s), requires_grad=True) for s in SUBSETS]
    out = psd.merge_logits(parts, SUBSETS)
    (out * torch.arange(6.0)).sum().backward()
    assert torch.equal(parts[1].grad, torch.tensor([[1.0, 3.0, 5.0]] * 3))
    with pytest.raises(ValueError, match="do not fit"):
        psd.merge_logits([torch.randn(3, 1), parts[1], parts[2]], SUBSETS)
    with pytest.raises(ValueError, match="exactly once"):
        psd.merge_logits(parts, [[4, 0], [1, 3, 5], [0]])


def test_kd_loss_reference_zero_and_gradient():
    s = torch.randn(4, 6, requires_grad=True)
    t1, t2 = torch.randn(4, 6), torch.randn(4, 6)
    direct = 0.5 * (((s - t1) ** 2).sum() + ((s - t2) ** 2).sum())
    assert torch.allclose(psd.kd_loss(s, [t1, t2]), direct)
    assert torch.allclose(psd.kd_loss(s, torch.stack([t1, t2], 1), "mean"), direct / 24)
    assert psd.kd_loss(s, [s.detach(), s.detach()]).item() == 0.0
    psd.kd_loss(s, t1).backward()
    assert torch.allclose(s.grad, s.detach() - t1)
    teacher = torch.randn(4, 6, requires_grad=True)  # a teacher's logits computed with autograd on
    psd.kd_loss(s, [teacher]).backward()
    assert teacher.grad is None, "teachers are not trained: their logits are detached"
    with pytest.raises(ValueError, match="must be \\(B, T, C\\)"):
        psd.kd_loss(s, torch.randn(4, 2, 5))
    with pytest.raises(ValueError, match="reduction"):
        psd.kd_loss(s, t1, "max")


def _tiny_model(C, seed=0):
    return psd.build_psd_model({"backbone": "small_resnet", "widths": [4, 8]}, C, seed)


def test_distillation_step_equals_asl_plus_kd_and_teacher_modes_agree():
    torch.manual_seed(0)
    model = _tiny_model(6)
    teacher = psd.TeacherEnsemble([_tiny_model(len(s), i) for i, s in enumerate(SUBSETS)], SUBSETS, 6).eval()
    x, y = torch.randn(5, 3, 16, 16), (torch.rand(5, 6) > 0.6).float()
    with torch.no_grad():
        t = teacher(x)
    step = psd.DistillationStep(kd_weight=0.5)
    loss, logs = step(model, [x, y, t[:, None]], None)
    logits = model(x)
    ref = AsymmetricLoss(gamma_pos=0, gamma_neg=4, clip=0.05)(logits, y) + 0.5 * 0.5 * ((logits - t) ** 2).sum()
    assert torch.allclose(loss, ref, rtol=1e-5)
    loss2, _ = psd.DistillationStep(kd_weight=0.5, teachers=[teacher], kd_subtask_only=False)(model, [x, y], None)
    assert torch.allclose(loss, loss2, rtol=1e-5)
    teacher.train()  # a teacher handed over in training mode still gives its eval-mode (BatchNorm running) logits
    loss3, _ = psd.DistillationStep(kd_weight=0.5, teachers=[teacher], kd_subtask_only=False)(model, [x, y], None)
    assert torch.allclose(loss, loss3, rtol=1e-5)
    with torch.no_grad():  # batch statistics would differ (on a copy: a training forward updates the running ones)
        assert not torch.allclose(copy.deepcopy(teacher).train()(x), t, atol=1e-3)
    teacher.eval()
    masked, _ = psd.DistillationStep(kd_weight=0.5, teachers=[teacher])(model, [x, y], None)  # default: Eq. 5's mask
    kd_mask = psd._teacher_masks([teacher], y)
    assert not kd_mask.all()  # some image lies outside some teacher's sub-task, so the default differs
    ref_masked = (AsymmetricLoss(gamma_pos=0, gamma_neg=4, clip=0.05)(logits, y)
                  + 0.5 * 0.5 * (kd_mask[:, 0] * (logits - t) ** 2).sum())
    assert torch.allclose(masked, ref_masked, rtol=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="needs teacher logits"):
        psd.DistillationStep()(model, [x, y], None)


def test_kd_domain_mask_is_eq5_membership():
    """Entry (i, c) is 1 exactly when image i contains a class of the subset holding c (x_i in X_{C_t})."""
    y = torch.tensor([[1, 0, 0, 0, 0, 0],   # class 0: subset {4, 0}
                      [0, 0, 0, 1, 0, 0],   # class 3: subset {1, 3, 5}
                      [0, 0, 0, 0, 0, 0]], dtype=torch.float32)
    m = psd.kd_domain_mask(y, SUBSETS)
    ref = torch.zeros(3, 6)
    for i in range(3):
        for sub in SUBSETS:
            if y[i, sub].any():
                ref[i, sub] = 1
    assert torch.equal(m, ref) and m[0].tolist() == [1, 0, 0, 0, 1, 0] and m[2].sum() == 0
    assert torch.equal(psd.kd_domain_mask(y, None), torch.ones(3, 6))


def _domain_mask_by_loops(y, subsets):
    ref = torch.zeros(y.shape)
    for i in range(y.shape[0]):
        for sub in subsets:
            if (y[i, list(sub)] > 0.5).any():
                ref[i, list(sub)] = 1
    return ref


def test_domain_masks_match_loops_on_random_partitions():
    """kd_domain_mask (a scatter-max on the device) and a TeacherEnsemble's own (its buffers) against the loops of
    Eq. 5's membership, on random partitions and soft labels; a class in no subset gets 0."""
    rng = np.random.default_rng(3)
    for trial in range(20):
        C = int(rng.integers(2, 12))
        k = int(rng.integers(1, C + 1))
        owner = np.concatenate([np.arange(k), rng.integers(0, k, C - k)])
        rng.shuffle(owner)
        subsets = [np.flatnonzero(owner == i) for i in range(k)]
        y = torch.from_numpy(rng.choice([0.0, 0.4, 0.6, 1.0], size=(9, C), p=[0.6, 0.1, 0.1, 0.2]).astype(np.float32))
        ref = _domain_mask_by_loops(y, subsets)
        assert torch.equal(psd.kd_domain_mask(y, subsets), ref), trial
        ens = psd.TeacherEnsemble([_tiny_model(len(s), i) for i, s in enumerate(subsets)], subsets, C)
        assert torch.equal(ens.domain_mask(y), ref), trial
        x = torch.randn(4, 3, 16, 16)
        with torch.no_grad():
            assert torch.equal(ens(x), psd.merge_logits([t(x) for t in ens.teachers], subsets, C)), trial
        if k > 1:  # a subset left out: its classes are in no teacher's domain
            assert torch.equal(psd.kd_domain_mask(y, subsets[1:]), _domain_mask_by_loops(y, subsets[1:]))
    with pytest.raises(ValueError, match=r"\(B, 6\) multi-hot"):
        psd.TeacherEnsemble([_tiny_model(len(s), i) for i, s in enumerate(SUBSETS)], SUBSETS, 6).domain_mask(y)


def test_masked_kd_and_step_follow_eq5():
    """With kd_subtask_only, teacher t's KD term counts only on the images of its sub-task; both teacher modes
    (precomputed logits + mask in the batch, teachers run on the batch) give the same loss."""
    torch.manual_seed(0)
    model = _tiny_model(6)
    teacher = psd.TeacherEnsemble([_tiny_model(len(s), i) for i, s in enumerate(SUBSETS)], SUBSETS, 6).eval()
    x = torch.randn(5, 3, 16, 16)
    y = torch.tensor([[1, 0, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 1], [0, 0, 1, 0, 0, 0],
                      [1, 1, 1, 1, 1, 1]], dtype=torch.float32)
    with torch.no_grad():
        t = teacher(x)
    mask = psd.kd_domain_mask(y, SUBSETS)
    logits = model(x)
    direct = 0.5 * (((logits - t) ** 2) * mask).sum()
    assert torch.allclose(psd.kd_loss(logits, t[:, None], mask=mask[:, None]), direct)
    assert direct < psd.kd_loss(logits, t[:, None])  # the masked entries were not zero
    step = psd.DistillationStep(kd_weight=0.5)
    loss, logs = step(model, [x, y, t[:, None], mask[:, None]], None)
    ref = AsymmetricLoss(gamma_pos=0, gamma_neg=4, clip=0.05)(logits, y) + 0.5 * direct
    assert torch.allclose(loss, ref, rtol=1e-5)
    loss2, _ = psd.DistillationStep(kd_weight=0.5, teachers=[teacher], kd_subtask_only=True)(model, [x, y], None)
    assert torch.allclose(loss, loss2, rtol=1e-5)
    with pytest.raises(ValueError, match="kd mask"):
        psd.kd_loss(logits, t[:, None], mask=mask)


def test_subtask_images_are_eq5s_domain():
    """Sub-task T_t's images and Eq. 5's KD mask are the same X_{C_t}, also for soft labels (present above 0.5)."""
    rng = np.random.default_rng(0)
    targets = rng.choice([0.0, 0.3, 0.7, 1.0], size=(40, 6)).astype(np.float32)
    subsets = [[0, 3], [1, 2, 5], [4]]
    mask = psd.kd_domain_mask(torch.from_numpy(targets), subsets).numpy()
    for sub in subsets:
        in_domain = np.flatnonzero(mask[:, sub[0]])
        assert psd.subtask_indices(targets, sub).tolist() == in_domain.tolist()
        assert 0 < len(in_domain) < len(targets)


def test_subtask_datasets_restrict_labels_and_select_images():
    targets = np.array([[1, 0, 0, 0, 0, 0], [0, 1, 0, 1, 0, 0], [0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1]])
    images = np.arange(4 * 3 * 4 * 4, dtype=np.uint8).reshape(4, 3, 4, 4)
    assert psd.subtask_indices(targets, [4, 0]).tolist() == [0, 3]
    assert psd.subtask_indices(targets, [4, 0], "all").tolist() == [0, 1, 2, 3]
    ds = psd.subtask_dataset(images, targets, [4, 0])
    assert len(ds) == 2 and ds.targets.tolist() == [[0, 1], [1, 0]]
    assert psd.subtask_dataset(images, targets, [2], "all").targets[:, 0].tolist() == [0, 0, 1, 0]
    with pytest.raises(ValueError, match="images must be one of"):
        psd.subtask_indices(targets, [0], "some")
    with pytest.raises(ValueError, match="repeated"):
        psd.subtask_indices(targets, [0, 0])
    with pytest.raises(ValueError, match="no training image"):
        psd.subtask_dataset(images, np.zeros_like(targets), [0])


def test_a_teachers_images_are_preprocessed_as_the_students():
    """Built from the student's TensorImageDataset, a sub-task keeps its normalisation and augmentation: it used to
    get the uint8 images alone, and with them the default normalisation and no augmentation."""
    from mlic_lib.data.tensors import TensorImageDataset

    targets = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 1], [1, 0, 1]])
    images = np.random.default_rng(0).integers(0, 256, size=(4, 3, 4, 4), dtype=np.uint8)
    student = TensorImageDataset(images, targets, mean=[0.1, 0.2, 0.3], std=[0.9, 0.8, 0.7],
                                 transform=lambda x: x.flip(-1))
    ds = psd.subtask_dataset(student, targets, [1, 0])
    assert isinstance(ds, TensorImageDataset) and len(ds) == 3  # images 0, 1 and 3 contain class 1 or 0
    for j, i in enumerate([0, 1, 3]):
        x, y = ds[j]
        torch.testing.assert_close(x, student[i][0], rtol=0, atol=0)
        assert y.tolist() == [float(targets[i, 1]), float(targets[i, 0])]
    with pytest.raises(ValueError, match="4 images but 3 label rows"):
        psd.subtask_dataset(student, targets[:3], [0])
    from types import SimpleNamespace  # what the chapter's teachers are built from: the student's dataset

    assert psd._teacher_images(SimpleNamespace(train=SimpleNamespace(images=images), train_ds=student)) is student


def test_teacher_ensemble_routes_classes_and_distill_dataset():
    ens = psd.TeacherEnsemble([_tiny_model(len(s), i) for i, s in enumerate(SUBSETS)], SUBSETS, 6)
    teacher, local = ens.teacher_for(3)
    assert teacher is ens.teachers[1] and local == 1
    from mlic_lib.data.tensors import TensorImageDataset

    base = TensorImageDataset(np.zeros((3, 3, 8, 8), np.uint8), np.zeros((3, 6)))
    dd = psd.DistillDataset(base, torch.randn(3, 2, 6))
    batch = dd.__getitems__([0, 2])
    assert len(batch) == 2 and batch[0][2].shape == (2, 6)
    with pytest.raises(ValueError, match="do not match"):
        psd.DistillDataset(base, torch.randn(3, 2, 5))
    # the DataLoader's batched fetch applies the base's transform as the one-item fetch does (it used to skip it)
    aug = TensorImageDataset(np.zeros((3, 3, 8, 8), np.uint8), np.zeros((3, 6)), transform=lambda u8: u8 + 255)
    dd_aug = psd.DistillDataset(aug, torch.randn(3, 2, 6))
    batched = torch.stack([item[0] for item in dd_aug.__getitems__([0, 2])])
    assert torch.equal(batched, torch.stack([dd_aug[0][0], dd_aug[2][0]]))
    assert dd_aug[0][0].mean() > 0  # the transformed 255 normalised (1 with the default mean/std), not 0 (-1)
    masked = psd.DistillDataset(base, torch.randn(3, 2, 6), torch.ones(3, 2, 6))
    assert len(masked[1]) == 4 and len(masked.__getitems__([0, 1])[1]) == 4
    with pytest.raises(ValueError, match="kd_mask"):
        psd.DistillDataset(base, torch.randn(3, 2, 6), torch.ones(3, 6))


def _settings(**psd_over):
    return {"chapter": "psd-test", "data": {"n_train": 40},
            "model": {"backbone": "small_resnet", "pool": "max", "widths": [4, 8]},
            "train": {"epochs": 1, "batch_size": 16, "lr": 0.003, "optimizer": "adam", "seed": 0, "device": "cpu"},
            "teacher_train": {"epochs": 1}, "psd": {"tau": 3.0, "parallel": "sequential", **psd_over}}


def _teacher_task(small_scenes, n: int):
    """``n`` half-resolution training scenes, their targets and a 2-way split of the 20 classes."""
    train, _ = small_scenes
    torch.set_num_threads(1)
    return train.images[:n, :, ::2, ::2].copy(), train.targets[:n], [np.arange(0, 10), np.arange(10, 20)]


def test_teacher_logits_are_computed_once_and_are_predict_logits(monkeypatch):
    """Students sharing a teacher (CGPD-k, DGPD-k and CPSD-k, the student seeds) read its logits from the cache:
    the same numbers as running it, for an ensemble too; other weights or images are run again."""
    from mlic_lib.data.tensors import TensorImageDataset

    g = torch.Generator().manual_seed(0)
    ds = TensorImageDataset(torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8, generator=g),
                            (torch.rand(10, 6, generator=g) > 0.5).float())
    ens = psd.TeacherEnsemble([_tiny_model(len(s), i) for i, s in enumerate(SUBSETS)], SUBSETS, 6).eval()
    want = psd.predict_logits(ens, ds)
    calls = []
    run = psd.predict_logits
    monkeypatch.setattr(psd, "predict_logits", lambda *a, **k: calls.append(1) or run(*a, **k))
    assert torch.equal(psd.teacher_logits(ens, ds), want) and len(calls) == 3  # one run per teacher
    assert torch.equal(psd.teacher_logits(ens, ds), want) and len(calls) == 3  # read back
    with torch.no_grad():
        ens.teachers[0].classifier.bias.add_(1.0)  # another teacher: run again
    assert not torch.equal(psd.teacher_logits(ens, ds), want) and len(calls) == 4
    other = TensorImageDataset(ds.images.flip(0), ds.targets)  # other images: run again
    psd.teacher_logits(ens.teachers[1], other)
    assert len(calls) == 5
    from mlic_lib import utils

    monkeypatch.setattr(utils, "library_digest", lambda roots=(): "edited")  # other code: run again
    psd.teacher_logits(ens.teachers[1], other)
    assert len(calls) == 6


def test_teacher_logits_key_every_input_and_recompute_a_cached_file_that_does_not_fit(monkeypatch):
    """The teacher's logits depend on the images' normalisation, the weights' layout, the thread count and torch's
    version as well: each reads no cached file of another; a cached file that is unreadable, of another length or
    damaged (checked against its CRC-32s) is computed again, and a cache that cannot be written still gives the
    logits."""
    from mlic_lib import utils
    from mlic_lib.data.tensors import TensorImageDataset
    from mlic_lib.engine import cache_root

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=g)
    ds = TensorImageDataset(images, (torch.rand(6, 3, generator=g) > 0.5).float())
    teacher = _tiny_model(3).eval()
    calls = []
    run = psd.predict_logits
    monkeypatch.setattr(psd, "predict_logits", lambda *a, **k: calls.append(1) or run(*a, **k))
    want = psd.teacher_logits(teacher, ds)
    assert len(calls) == 1 and torch.equal(psd.teacher_logits(teacher, ds), want) and len(calls) == 1
    other_norm = TensorImageDataset(images, ds.targets, mean=[0.4, 0.5, 0.6], std=[0.2, 0.3, 0.4])
    assert not torch.equal(psd.teacher_logits(teacher, other_norm), want) and len(calls) == 2
    psd.teacher_logits(teacher.to(memory_format=torch.channels_last), ds)  # other float sums
    assert len(calls) == 3
    teacher = teacher.to(memory_format=torch.contiguous_format)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads % 2 + 1)  # 1 <-> 2: other reduction orders
        psd.teacher_logits(teacher, ds)
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 4
    before = set((cache_root() / "teacher-logits").iterdir())
    monkeypatch.setattr(torch, "__version__", "0.0.1-other")
    psd.teacher_logits(teacher, ds)
    assert len(calls) == 5
    (path,) = set((cache_root() / "teacher-logits").iterdir()) - before  # the file of this key
    for bad in (b"garbage, not a torch file", None):
        if bad is None:
            torch.save(want[:-1].clone(), path)  # a tensor of another length
        else:
            path.write_bytes(bad)
        assert torch.equal(psd.teacher_logits(teacher, ds), want)
    assert len(calls) == 7
    raw = bytearray(path.read_bytes())  # the logits written again; one flipped bit in their stored floats
    at = bytes(raw).find(want.numpy().tobytes()[:16])
    raw[at + 3] ^= 0x40
    path.write_bytes(bytes(raw))
    assert torch.equal(psd.teacher_logits(teacher, ds), want) and len(calls) == 8  # checked, not distilled
    stale, other = path.parent / f".{path.name}.abcd1234.tmp", path.parent / "notes.txt"  # a killed writer's leftover
    for f in (stale, other):
        f.write_bytes(b"x")
        os.utime(f, (0, 0))
    psd.teacher_logits(teacher, ds)
    assert not stale.exists() and other.exists()

    def read_only(*a, **k):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(utils, "atomic_torch_save", read_only)
    monkeypatch.setattr(torch, "__version__", "0.0.2-other")
    assert torch.equal(psd.teacher_logits(teacher, ds), want) and len(calls) == 9


def test_teachers_are_cached_and_deterministic(small_scenes):
    imgs, tg, subsets = _teacher_task(small_scenes, 40)
    ens_a, runs_a = psd.train_teachers(_settings(), imgs, tg, subsets, parallel="sequential")
    assert not runs_a[0].cached
    ens_b, runs_b = psd.train_teachers(_settings(), imgs, tg, subsets)
    assert all(b.cached and b.run_dir == a.run_dir for a, b in zip(runs_a, runs_b, strict=True))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ens_a(x), ens_b(x))
    # a fresh training with the same seed (new cache key via a no-op option) gives the same weights
    ens_c, runs_c = psd.train_teachers(_settings(unused=1) | {"chapter": "psd-test2"}, imgs, tg, subsets)
    assert not runs_c[0].cached
    with torch.no_grad():
        assert torch.allclose(ens_a(x), ens_c(x), atol=1e-6)


@pytest.mark.slow
def test_process_pool_gives_the_same_teachers_as_sequential(small_scenes):
    imgs, tg, subsets = _teacher_task(small_scenes, 24)
    seq, _ = psd.train_teachers(_settings(), imgs, tg, subsets, parallel="sequential")
    par, runs = psd.train_teachers({**_settings(), "chapter": "psd-pool"}, imgs, tg, subsets, parallel="process",
                                   max_workers=2)
    assert not any(r.cached for r in runs)  # trained by the workers in this call, loaded from their folders
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(seq(x), par(x), atol=1e-5)


def _inline_pools(monkeypatch) -> list[int]:
    """Run the library's process pools inline (no spawned interpreters); returns the list of pool sizes started."""
    from mlic_lib import process_pool

    started = []

    def inline(fn, tasks, *, max_workers=None, desc=None, threads=None):
        tasks = [tuple(t) for t in tasks]
        if tasks:
            started.append(len(tasks))
        return [fn(*t) for t in tasks]

    monkeypatch.setattr(process_pool, "map_in_processes", inline)
    return started


def _half_res_scenes(small_scenes):
    from mlic_lib.data.tensors import TensorImageDataset
    from mlic_lib.experiments import SceneData

    full_train, test = small_scenes
    train = dataclasses.replace(full_train, images=full_train.images[:, :, ::2, ::2].copy())  # the fixture stays intact
    return SceneData(train, test, TensorImageDataset(train.images, train.targets),
                     TensorImageDataset(test.images[:, :, ::2, ::2].copy(), test.targets))


def test_a_pooled_study_starts_two_pools(small_scenes, monkeypatch):
    """psd.parallel 'process': every teacher of the study in one pool, then the baseline and every student in
    another (one pool per decomposition made CPSD slower pooled than sequential on a 16-core GPU machine); a rerun
    finds everything cached and starts none."""
    from mlic_lib.partition import similarity_matrix

    data = _half_res_scenes(small_scenes)
    S = similarity_matrix(targets=data.train_targets)
    s = _settings(ks=[1, 2], cpsd_k=2, n_init=4, parallel="process")
    started = _inline_pools(monkeypatch)
    study = psd.run_study(s, data, S)
    n_teachers = sum(len(v) for v in study.subsets.values())
    assert started == [n_teachers, 1 + len(study.students)] == [7, 6]  # k=1: 1, k=2: CGP, DGP, random 2 each
    assert psd.run_study(s, data, S).students["cpsd-2"].cached and started == [7, 6]


def test_train_runs_in_a_pool_match_one_process(small_scenes, monkeypatch):
    """train_runs: the students and baseline a pool trains (its workers load the teachers from the cache by their
    specs) are the runs one process trains, in the requests' order; teachers without specs are refused."""
    data = _half_res_scenes(small_scenes)
    torch.set_num_threads(1)
    s = _settings()
    ens, _ = psd.train_teachers(s, data.train_ds, data.train_targets, [np.arange(0, 10), np.arange(10, 20)])
    ens.run_key = ["t"]

    def requests(settings):
        return [psd.RunRequest(settings, 0, "cgpd-2", [ens], ens.run_key), psd.RunRequest(settings, 1, "baseline")]

    seq = psd.train_runs(requests(s), data)
    started = _inline_pools(monkeypatch)
    pooled_settings = {**s, "chapter": "psd-pool", "psd": {**s["psd"], "parallel": "process"}}
    par = psd.train_runs(requests(pooled_settings), data)
    assert started == [2] and not any(r.cached for r in par)
    for a, b in zip(seq, par, strict=True):
        assert a.run_dir != b.run_dir and a.final["mAP"] == pytest.approx(b.final["mAP"], abs=1e-6)
    assert "kd" in par[0].history[-1] and "kd" not in par[1].history[-1]  # a student, then the baseline
    assert all(r.cached for r in psd.train_runs(requests(pooled_settings), data)) and started == [2]
    bare = psd.TeacherEnsemble([_tiny_model(10, 0), _tiny_model(10, 1)], [np.arange(0, 10), np.arange(10, 20)], 20)
    with pytest.raises(ValueError, match="no TeacherSpec.*parallel='sequential'"):
        psd.train_runs([psd.RunRequest(pooled_settings, 0, "x", [bare], ["bare"])], data)


@pytest.mark.slow
def test_train_runs_in_a_real_pool(small_scenes):
    """The spawned path: workers receive the data pickled, load the teachers from the cache by their specs and train
    the student and the baseline, which this process then loads; a teacher missing from the cache is an error in the
    worker, not a silent retraining."""
    data = _half_res_scenes(small_scenes)
    s = _settings(parallel="process")
    ens, _ = psd.train_teachers(s, data.train_ds, data.train_targets, [np.arange(0, 10), np.arange(10, 20)],
                                parallel="sequential")
    reqs = [psd.RunRequest(s, 0, "cgpd-2", [ens], ["t"]), psd.RunRequest(s, 0, "baseline")]
    runs = psd.train_runs(reqs, data, max_workers=2)
    assert not any(r.cached for r in runs) and all(0 <= r.final["mAP"] <= 1 for r in runs)
    import shutil

    shutil.rmtree(ens.specs[0].run_dir())
    with pytest.raises(RuntimeError, match="not in the run cache"):
        psd.train_runs([psd.RunRequest(s, 1, "cgpd-2", [ens], ["t"]), psd.RunRequest(s, 1, "baseline")], data,
                       max_workers=2)


def test_process_mode_under_torchrun_and_the_study_override(small_scenes, monkeypatch):
    """psd.parallel: process under torchrun is refused (each rank would start a pool whose workers inherit its
    torchrun variables); run_study's parallel= reaches the teachers too (no pool per decomposition)."""
    from mlic_lib.partition import similarity_matrix

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="process under torchrun.*psd.parallel: torchrun"):
        psd.resolve_mode(_settings(parallel="process"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    started = _inline_pools(monkeypatch)
    data = _half_res_scenes(small_scenes)
    psd.run_study(_settings(ks=[1, 2], cpsd_k=2, n_init=4, parallel="process"), data,
                  similarity_matrix(targets=data.train_targets), parallel="sequential")
    assert started == []


def test_bad_parallel_mode():
    with pytest.raises(ValueError, match="parallel must be one of"):
        psd.train_teachers(_settings(), np.zeros((2, 3, 8, 8), np.uint8), np.eye(2), [[0], [1]], parallel="gpu")


def test_smoke_study(small_scenes, monkeypatch):
    """A tiny end-to-end run of the chapter's study: baseline, SD, CGPD/DGPD/random at k=2, CPSD."""
    from mlic_lib.partition import similarity_matrix

    data = _half_res_scenes(small_scenes)
    train = data.train
    s = _settings(ks=[1, 2], cpsd_k=2, n_init=4)
    handed = {}  # student name -> the teachers run_study distils into it
    real_train_student = psd.train_student

    def recording(settings, data_, teachers, **kw):
        handed[kw["name"]] = list(teachers)
        return real_train_student(settings, data_, teachers, **kw)

    monkeypatch.setattr(psd, "train_student", recording)
    study = psd.run_study(s, data, similarity_matrix(targets=train.targets))
    monkeypatch.undo()
    e = study.ensembles
    # CPSD (Eq. 7) distils the CGP and the DGP teachers of k = cpsd_k together; the others one decomposition each
    assert handed["cpsd-2"][0] is e[("cgp", 2, 0)] and handed["cpsd-2"][1] is e[("dgp", 2, 0)], handed
    assert handed["cgpd-2"] == [e[("cgp", 2, 0)]] and handed["dgpd-2"] == [e[("dgp", 2, 0)]]
    assert handed["sd"] == [e[("cgp", 1, 0)]] and len(study.subsets[("cgp", 1, 0)]) == 1
    with pytest.raises(ValueError, match="kd_images"):
        psd.train_student(_settings(kd_images="some"), data, [study.ensembles[("cgp", 2, 0)]])
    assert set(study.students) == {"sd", "cgpd-2", "dgpd-2", "random-2-s0", "cpsd-2"}
    for run in study.students.values():
        assert 0.0 <= run.final["mAP"] <= 1.0
        assert {"cls", "kd"} <= set(run.history[-1])
    assert len(study.subsets[("cgp", 2, 0)]) == 2


@pytest.mark.parametrize("psd_over, masked", [({}, True), ({"kd_images": "all"}, False),
                                              ({"image_selection": "all"}, False)])
def test_train_student_hands_fit_the_eq5_mask_by_default(small_scenes, monkeypatch, psd_over, masked):
    """The chapter's path (precomputed teacher logits): the dataset carries each teacher's Eq. 5 mask under the
    paper's defaults (kd_images 'subtask', teachers on the images that contain their sub-task) and none otherwise;
    an augmented dataset runs the teachers on each batch instead, with the same mask rule."""
    from mlic_lib.data.tensors import TensorImageDataset
    from mlic_lib.experiments import SceneData

    train, test = small_scenes
    imgs = train.images[:24, :, ::2, ::2].copy()
    data = SceneData(train, test, TensorImageDataset(imgs, train.targets[:24]),
                     TensorImageDataset(test.images[:8, :, ::2, ::2].copy(), test.targets[:8]))
    ens = psd.TeacherEnsemble([_tiny_model(10, 0), _tiny_model(10, 1)], [np.arange(0, 10), np.arange(10, 20)], 20)
    ens.run_key = ["tiny-0", "tiny-1"]  # what decomposition_teachers sets: the student's cache key names its teachers
    calls = []
    monkeypatch.setattr(psd, "fit", lambda model, ds, val, cfg, step, **kw: calls.append((ds, step)))
    psd.train_student(_settings(**psd_over), data, [ens], name="mask-test")
    ds, step = calls[-1]
    assert isinstance(ds, psd.DistillDataset) and step.teachers is None
    if masked:
        want = psd._teacher_masks([ens], torch.as_tensor(train.targets[:24], dtype=torch.float32))
        assert ds.kd_mask is not None and torch.equal(ds.kd_mask, want) and not bool(want.all())
    else:
        assert ds.kd_mask is None
    data.train_ds.transform = lambda u8: u8.flip(-1)
    psd.train_student(_settings(**psd_over), data, [ens], name="mask-test-aug")
    ds, step = calls[-1]
    assert ds is data.train_ds and step.teachers == [ens] and step.kd_subtask_only is masked


def test_a_bad_decomposition_is_refused_before_anything_trains(small_scenes, monkeypatch):
    """k above the number of classes, or (teachers on the images that contain their classes) a class without a
    training positive, which spectral clustering isolates as a sub-task with no image: refused by run_study and
    pretrain_teachers before the baseline or the first teacher trains (it used to surface hours into a run)."""
    from mlic_lib.data.tensors import TensorImageDataset
    from mlic_lib.experiments import SceneData
    from mlic_lib.partition import similarity_matrix

    train, test = small_scenes
    targets = train.targets[:40].copy()
    targets[:, 19] = 0  # class 19 has no training positive
    imgs = train.images[:40, :, ::2, ::2].copy()
    data = SceneData(dataclasses.replace(train, images=imgs, targets=targets), test,
                     TensorImageDataset(imgs, targets), TensorImageDataset(test.images[:8, :, ::2, ::2].copy(),
                                                                           test.targets[:8]))

    def no_training(*a, **k):
        raise AssertionError("trained before the decompositions were checked")

    monkeypatch.setattr(psd, "fit", no_training)
    monkeypatch.setattr(psd, "_fit_teacher", no_training)
    S = similarity_matrix(targets=targets)
    for run in (psd.run_study, psd.pretrain_teachers):
        with pytest.raises(ValueError, match="k must be between"):
            run(_settings(ks=[1, 500], cpsd_k=500, n_init=2), data, S)
        with (pytest.warns(UserWarning, match=r"classes \[19\] have no edge in the graph"),  # the partition's note
              pytest.raises(ValueError, match=r"no training image contains.*\[19\]|\[19\].*no training image")):
            run(_settings(ks=[1, 2], cpsd_k=2, n_init=2), data, S)
    with pytest.warns(UserWarning, match=r"classes \[19\] have no edge in the graph"):
        assert psd.planned_decompositions(_settings(ks=[1, 2], cpsd_k=2, n_init=2, image_selection="all"), data, S)


def test_the_paper_defaults_are_pinned():
    """Eq. 1's root tau = 3, Eq. 2's Laplacian as printed, Eq. 5's sub-task images, Eq. 6's weights: the
    library's defaults and every profile of the chapter (the authors' code differs on tau and the Laplacian:
    options, not defaults)."""
    import inspect

    from mlic_lib import partition as P
    from mlic_lib.profiles import load_profile

    sig = inspect.signature(P.partition_labels).parameters
    assert sig["tau"].default == 3.0 and sig["laplacian"].default == "eq2"
    assert inspect.signature(P.affinity).parameters["tau"].default == 3.0
    assert inspect.signature(P.spectral_partition).parameters["laplacian"].default == "eq2"
    for profile in ("smoke", "default", "full"):
        p = load_profile("psd", profile)["psd"]
        assert (p["tau"], p["laplacian"], p["image_selection"], p["kd_images"]) == (3.0, "eq2", "containing",
                                                                                     "subtask"), profile
        # Eq. 6 as printed: ASL plus the summed MSEs at weight 1; DGP on 1 - R (I - R has no normalised cut)
        assert (p["kd_weight"], p["kd_reduction"], p["complement"]) == (1.0, "sum", "ones"), profile


def test_pretrain_teachers_fills_the_cache_the_study_reads(small_scenes, monkeypatch):
    """``mlic teachers`` (pretrain_teachers), split over two simulated torchrun ranks, trains every teacher of the
    chapter once; the study's decompositions (and section 3b's other image selection) then only load them."""
    from mlic_lib.partition import similarity_matrix

    data = _half_res_scenes(small_scenes)
    s = _settings(ks=[1, 2], cpsd_k=2, n_init=4)
    S = similarity_matrix(targets=data.train_targets)
    assert psd.study_decompositions(s) == [("cgp", 1, 0), ("cgp", 2, 0), ("dgp", 2, 0), ("random", 2, 0)]
    monkeypatch.setenv("WORLD_SIZE", "2")
    counts = []
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        counts.append(psd.pretrain_teachers(s, data, S, progress=False))
        assert os.environ["WORLD_SIZE"] == "2"  # restored after the rank's single-process training
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert psd.pretrain_teachers(s, data, S, progress=False) == 0  # all cached: an interrupted run resumes
    assert abs(counts[0] - counts[1]) <= 1 and sum(counts) >= 7  # k=1: 1, k=2: 2 CGP + 2 DGP + 2 random, ...
    fits = []
    real_fit = psd._fit_teacher
    monkeypatch.setattr(psd, "_fit_teacher", lambda *a, **k: fits.append(real_fit(*a, **k)) or fits[-1])
    variants = psd.selection_variants(s)
    assert list(variants) == ["all", "containing, matched steps"]
    for settings, (strategy, k, rseed) in [(s, d) for d in psd.study_decompositions(s)] + [
            (v, (g, 2, 0)) for v in variants.values() for g in ("cgp", "dgp")]:
        psd.decomposition_teachers(settings, data, S, strategy, k, rseed=rseed)
    assert len({f.run_dir for f in fits}) == sum(counts) and all(r.cached for r in fits)


def test_matched_epochs_matches_the_steps_of_a_teacher_on_all_images():
    """psd.teacher_epochs: matched_steps: the epochs over a sub-task's images whose optimiser steps (the last batch
    kept) come closest to those of the same epochs over every image, and never fewer epochs than that."""
    assert psd.matched_epochs(4, 64, 300, 1500) == 19  # 5 batches an epoch: 95 steps against 4 x 24 = 96
    assert psd.matched_epochs(20, 32, 41, 1000) == 320  # 2 batches an epoch: 640 steps against 20 x 32
    assert psd.matched_epochs(1, 16, 7, 8) == 1  # 1 batch an epoch either way
    assert psd.matched_epochs(3, 64, 1500, 1500) == 3
    assert psd.matched_epochs(2, 10, 12, 31) == 4  # 2 batches an epoch (the last one kept): 8 steps for 2 x 4
    for bad in [(4, 64, 0, 10), (4, 64, 11, 10), (0, 64, 5, 10), (4, 0, 5, 10)]:
        with pytest.raises(ValueError, match="n_images <= n_all"):
            psd.matched_epochs(*bad)


def test_teacher_steps_are_the_training_loaders_batches(small_scenes):
    """teacher_steps (the chapter's step counts, and what matched_steps matches) equals epochs x the batches of the
    loader fit trains a teacher with, for the profile's and the matched-steps teachers."""
    from mlic_lib.engine import make_loader

    imgs, tg, _ = _teacher_task(small_scenes, 40)
    subsets = [[0, 1], [2, 3, 4], list(range(5, 20))]
    for s in (_settings(), _settings(teacher_epochs="matched_steps")):
        s["teacher_train"] = {"epochs": 2, "batch_size": 6}
        expected = []
        for sub in subsets:
            spec = psd._teacher_spec(s, sub, seed=0, targets=tg)
            loader = make_loader(psd.subtask_dataset(imgs, tg, sub, spec.images), 6, shuffle=True)
            expected.append(spec.train["epochs"] * len(loader))
        assert psd.teacher_steps(s, subsets, tg) == expected
    fixed, matched = (psd.teacher_steps(_settings(teacher_epochs=t), subsets, tg) for t in ("fixed", "matched_steps"))
    on_all = psd.teacher_steps(_settings(image_selection="all"), subsets, tg)
    assert all(f <= a for f, a in zip(fixed, on_all, strict=True)) and fixed != on_all
    # one teacher epoch in _settings: the fixed counts are the batches of an epoch, matched is within half of one
    assert all(abs(m - a) <= f / 2 for m, a, f in zip(matched, on_all, fixed, strict=True)), (fixed, matched, on_all)


def test_matched_steps_teachers_train_longer_on_their_images_only():
    """Under teacher_epochs: matched_steps a teacher on the images containing its classes gets matched_epochs; one on
    all images (or the baseline) keeps the profile's epochs; without the labels the epochs cannot be set."""
    targets = np.zeros((100, 4), np.float32)
    targets[:20, 0] = 1  # class 0 in 20 images, class 1..3 in all of them
    targets[:, 1:] = 1
    s = _settings(teacher_epochs="matched_steps")
    s["teacher_train"] = {"epochs": 2, "batch_size": 10}
    spec = psd._teacher_spec(s, [0], seed=0, targets=targets)
    assert spec.train["epochs"] == psd.matched_epochs(2, 10, 20, 100) == 10
    assert psd._teacher_spec(s, [1, 2], seed=0, targets=targets).train["epochs"] == 2  # every image has them
    assert psd._teacher_spec({**s, "psd": {**s["psd"], "image_selection": "all"}}, [0], seed=0).train["epochs"] == 2
    assert psd._teacher_spec(_settings(), [0], seed=0, targets=targets).train["epochs"] == 1  # 'fixed' (default)
    with pytest.raises(ValueError, match="matched_steps.*targets="):
        psd._teacher_spec(s, [0], seed=0)
    with pytest.raises(ValueError, match="psd.teacher_epochs must be one of"):
        psd.check_options({"teacher_epochs": "long"})
    assert list(psd.selection_variants({**s, "psd": {"image_selection": "all"}})) == ["containing"]
    assert list(psd.selection_variants(s)) == ["all"]  # matched already: no extra column
    assert list(psd.selection_variants(_settings(matched_steps_check=False))) == ["all"]  # the full recipe's choice
    with pytest.raises(ValueError, match="matched_steps_check must be true or false"):
        psd.check_options({"matched_steps_check": "yes"})


def test_a_students_cache_key_names_its_teachers(small_scenes, monkeypatch):
    """Two sets of teachers give two students, with or without teacher_key: the key comes from each ensemble's
    run_key (or its specs); teachers that cannot name themselves are refused instead of keyed on None (a student
    of the CGP teachers was loaded back for the DGP ones)."""
    from mlic_lib.data.tensors import TensorImageDataset
    from mlic_lib.experiments import SceneData

    train, test = small_scenes
    data = SceneData(train, test, TensorImageDataset(train.images[:24, :, ::2, ::2].copy(), train.targets[:24]),
                     TensorImageDataset(test.images[:8, :, ::2, ::2].copy(), test.targets[:8]))
    subsets = [np.arange(0, 10), np.arange(10, 20)]
    a = psd.TeacherEnsemble([_tiny_model(10, 0), _tiny_model(10, 1)], subsets, 20)
    b = psd.TeacherEnsemble([_tiny_model(10, 2), _tiny_model(10, 3)], subsets, 20)
    dirs = []
    monkeypatch.setattr(psd, "fit", lambda model, ds, val, cfg, step, run_dir, **kw: dirs.append(run_dir))
    for bare in (a, b):
        with pytest.raises(ValueError, match="teacher_key is needed"):
            psd.train_student(_settings(), data, [bare], name="key-test")
        with pytest.raises(ValueError, match="teacher_key is needed"):
            psd.RunRequest(_settings(), 0, "key-test", [bare]).run_dir(20)
    assert not dirs
    a.run_key, b.run_key = ["cgp-0", "cgp-1"], ["dgp-0", "dgp-1"]
    for ens in (a, b):
        psd.train_student(_settings(), data, [ens], name="key-test")
        assert dirs[-1] == psd.RunRequest(_settings(), 0, "key-test", [ens]).run_dir(20)
    assert dirs[0] != dirs[1]
    psd.train_student(_settings(), data, [a], name="key-test", teacher_key=a.run_key)  # the explicit key: the same run
    assert dirs[-1] == dirs[0]
    specs = [psd._teacher_spec(_settings(), sub, seed=0) for sub in subsets]  # teachers from the run cache
    c = psd.TeacherEnsemble([_tiny_model(10, 4), _tiny_model(10, 5)], subsets, 20, specs=specs)
    psd.train_student(_settings(), data, [c], name="key-test")
    assert dirs[-1] not in dirs[:2]


def test_a_student_starts_from_its_own_seeds_weights(small_scenes, monkeypatch):
    """Each student seed must start from build_psd_model(..., seed): students built with one seed would all start
    alike, and the seed spread the chapter reports would shrink."""
    from mlic_lib.data.tensors import TensorImageDataset
    from mlic_lib.experiments import SceneData

    train, test = small_scenes
    data = SceneData(train, test, TensorImageDataset(train.images[:24, :, ::2, ::2].copy(), train.targets[:24]),
                     TensorImageDataset(test.images[:8, :, ::2, ::2].copy(), test.targets[:8]))
    ens = psd.TeacherEnsemble([_tiny_model(10, 0), _tiny_model(10, 1)], [np.arange(0, 10), np.arange(10, 20)], 20)
    ens.run_key = ["tiny-0", "tiny-1"]  # what decomposition_teachers sets: the student's cache key names its teachers
    built = {}
    monkeypatch.setattr(psd, "fit", lambda model, ds, val, cfg, step, **kw: built.setdefault(cfg.seed, model))
    settings = _settings()
    for seed in (1, 2):
        psd.train_student(settings, data, [ens], seed=seed, name="seed-test")
        want = psd.build_psd_model(settings["model"], 20, seed).state_dict()
        assert all(torch.equal(a, want[k]) for k, a in built[seed].state_dict().items())
    assert not torch.equal(built[1].classifier.weight, built[2].classifier.weight)


def test_the_label_mask_reaches_every_classification_loss():
    """A masked label (VOC difficult with difficult_train: ignore) must not count in ASLStep, in the student's
    classification term, nor be lost by a sub-task view of a dataset that yields (x, y, mask)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
    x, y = torch.randn(5, 3, 2, 2), (torch.rand(5, 4) > 0.5).float()
    mask = torch.ones(5, 4, dtype=torch.bool)
    mask[0] = False  # one image's labels all unknown
    asl = psd._asl(None)
    want = asl(model(x).float(), y, mask)
    assert not torch.allclose(want, asl(model(x).float(), y))
    torch.testing.assert_close(psd.ASLStep()(model, [x, y, mask], "cpu")[0], want)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
    loss, logs = psd.DistillationStep(kd_weight=0.0, teachers=[teacher])(model, [x, y, mask], "cpu")
    torch.testing.assert_close(logs["cls"], want)

    class WithMask(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return x[i], y[i], mask[i]

    view = psd.subtask_dataset(WithMask(), y.numpy(), [2, 0], images="all")
    item = view[0]
    assert len(item) == 3 and torch.equal(item[1], y[0, [2, 0]]) and torch.equal(item[2], mask[0, [2, 0]])


def test_the_profiles_asl_options_reach_the_loss():
    """psd.asl (gamma_neg, clip, and the full profile's detach_focal_weight) must build the loss, not the defaults."""
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(6, 5, generator=g) * 2, (torch.rand(6, 5, generator=g) > 0.6).float()
    torch.testing.assert_close(psd._asl({"gamma_neg": 2.0, "clip": 0.0})(logits, y),
                               AsymmetricLoss(gamma_pos=0.0, gamma_neg=2.0, clip=0.0)(logits, y))
    assert not torch.allclose(psd._asl({"gamma_neg": 2.0, "clip": 0.0})(logits, y), psd._asl(None)(logits, y))
    assert psd._asl({"detach_focal_weight": True}).detach_focal_weight is True
    assert psd.ASLStep({"gamma_neg": 1.0}).loss.gamma_neg == 1.0


def test_matched_epochs_is_the_closest_step_count_written_out():
    """The epochs whose step count is *closest* to the target (rounded, not truncated), never fewer than ``epochs``;
    checked against a direct search over the candidates (tie cases skipped: either neighbour is as close)."""
    assert psd.matched_epochs(5, 10, 35, 70) == 9  # 4 batches an epoch: 36 steps against 5 x 7 = 35 (8 gives 32)
    for epochs, bs, n_img, n_all in [(e, b, i, a) for e in (1, 2, 5) for b in (8, 10, 32)
                                     for a in (50, 97, 200) for i in range(1, a + 1, 7)]:
        per, target = -(-n_img // bs), epochs * -(-n_all // bs)
        gaps = {e: abs(e * per - target) for e in range(epochs, target + 2)}
        best = min(gaps.values())
        winners = [e for e, g in gaps.items() if g == best]
        if len(winners) == 1:
            assert psd.matched_epochs(epochs, bs, n_img, n_all) == winners[0], (epochs, bs, n_img, n_all)


def test_the_study_partitions_with_every_option_of_the_profile():
    """The study's decompositions (psd._decompose) are partition_labels with the profile's tau, complement,
    cluster_seed, n_init, laplacian and random_sizes (the random ones seeded by their own seed), and with the paper's
    defaults where the profile is silent: a dropped option would repartition every chapter run without a word."""
    from mlic_lib import partition as P

    rng = np.random.default_rng(0)
    S = P.similarity_matrix(targets=(rng.random((300, 12)) < rng.uniform(0.02, 0.6, 12)).astype(int))
    for strategy in ("cgp", "dgp"):
        assert all(np.array_equal(a, b) for a, b in zip(
            psd._decompose({"psd": {}}, S, strategy, 4, 12),
            P.partition_labels(strategy, 4, S=S, tau=3.0, complement="ones", seed=0, n_init=20, laplacian="eq2"),
            strict=True))
        seen = set()
        for lap in P.LAPLACIANS:
            for cseed in range(3):
                p = {"tau": 2.0, "laplacian": lap, "cluster_seed": cseed, "n_init": 1}
                got = psd._decompose({"psd": p}, S, strategy, 4, 12, rseed=7)
                ref = P.partition_labels(strategy, 4, S=S, tau=2.0, seed=cseed, n_init=1, laplacian=lap)
                assert all(np.array_equal(a, b) for a, b in zip(got, ref, strict=True)), (strategy, p)
                seen.add(P.assignment_from_subsets(got).tobytes())
        assert len(seen) > 2  # the options change the partition here, so each one's arrival is checked
        with pytest.raises(ValueError, match="negative off-diagonal"):
            psd._decompose({"psd": {"complement": "identity"}}, S, "dgp", 4, 12)
    for rseed in (0, 1):  # random partitions: their own seed and the profile's random_sizes
        got = psd._decompose({"psd": {"random_sizes": "random", "cluster_seed": 5}}, S, "random", 4, 12, rseed)
        ref = P.partition_labels("random", 4, num_classes=12, seed=rseed, random_sizes="random")
        assert all(np.array_equal(a, b) for a, b in zip(got, ref, strict=True))
    assert not np.array_equal(P.random_partition(12, 4, 0, "random"), P.random_partition(12, 4, 0, "equal"))


def test_a_soft_label_of_one_half_is_outside_the_subtask_as_in_the_kd_mask():
    """'Present above 0.5': a soft label of exactly 0.5 puts an image neither in a teacher's images nor in its Eq. 5
    KD domain (the two are the same X_{C_t})."""
    targets = np.array([[0.5, 0.0, 0.0], [0.0, 0.5, 1.0], [0.51, 0.0, 0.0]], dtype=np.float32)
    subsets = [[0], [1, 2]]
    assert psd.subtask_indices(targets, [0]).tolist() == [2]
    assert psd.subtask_indices(targets, [1]).tolist() == []
    mask = psd.kd_domain_mask(torch.from_numpy(targets), subsets)
    assert mask[:, 0].tolist() == [0.0, 0.0, 1.0] and mask[:, 1].tolist() == [0.0, 1.0, 0.0]


def test_run_study_hands_each_student_the_teachers_of_its_own_decomposition(monkeypatch):
    """Without training anything: every student of the study (SD, CGPD-k, DGPD-k, each random seed's, CPSD) is
    handed the ensemble of its own decomposition, the random students that of their own random seed."""
    from types import SimpleNamespace

    from mlic_lib.partition import similarity_matrix

    rng = np.random.default_rng(0)
    targets = (rng.random((60, 8)) < 0.4).astype(np.float32)
    data = SimpleNamespace(num_classes=8, train_targets=targets)
    monkeypatch.setattr(psd, "decomposition_teachers",
                        lambda settings, data, S, strategy, k, *, seed, rseed, subsets, parallel:
                        (subsets, SimpleNamespace(tag=(strategy, k, rseed)), 0.5))
    monkeypatch.setattr(psd, "train_runs", lambda requests, data, **kw:
                        [SimpleNamespace(teachers=[t.tag for t in r.teachers]) for r in requests])
    study = psd.run_study(_settings(ks=[1, 2, 3], cpsd_k=3, n_init=2, random_seeds=[0, 1, 4]), data,
                          similarity_matrix(targets=targets))
    got = {name: run.teachers for name, run in study.students.items()}
    want = {"sd": [("cgp", 1, 0)], "cpsd-3": [("cgp", 3, 0), ("dgp", 3, 0)]}
    for k in (2, 3):
        want |= {f"cgpd-{k}": [("cgp", k, 0)], f"dgpd-{k}": [("dgp", k, 0)]}
        want |= {f"random-{k}-s{rs}": [("random", k, rs)] for rs in (0, 1, 4)}
    assert got == want and study.baseline.teachers == []
