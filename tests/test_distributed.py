"""Cross-rank losses on a real 2-process gloo group: each rank holds half of the global batch, and
the losses and gradients must equal one process on the whole batch (the distributed-loss bugs
users hit elsewhere: gathered negatives and centres with the wrong gradients or scales)."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from ssl_vit.distributed import mean_over_ranks
from ssl_vit.losses import clip_loss, info_nce, nt_xent, sinkhorn_knopp_teacher_probs

WORLD = 2


def _losses_and_grads(z1, z2, q, k):
    z1, z2, q = (t.clone().requires_grad_() for t in (z1, z2, q))
    simclr = nt_xent(z1, z2, 0.1)
    moco = info_nce(q, k, 0.2)
    clip = clip_loss(F.normalize(z1, dim=-1), F.normalize(q, dim=-1), torch.tensor(14.3))  # images z1, texts q
    (simclr + moco + clip).backward()
    losses = {"simclr": simclr.detach(), "moco": moco.detach(), "clip": clip.detach()}
    return {**losses, "z1": z1.grad, "z2": z2.grad, "q": q.grad}


def _rank_main(rank, init_file, inputs, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    n = inputs["z1"].shape[0] // WORLD
    local = {name: t[rank * n : (rank + 1) * n] for name, t in inputs.items()}
    result = _losses_and_grads(local["z1"], local["z2"], local["q"], local["k"])
    result["center"] = mean_over_ranks(local["t"].mean(0, keepdim=True))
    result["sinkhorn"] = sinkhorn_knopp_teacher_probs(local["t"], 0.1)
    # iBOT's masked patches: another number on each rank (3 and 5 of the 8)
    result["sinkhorn_uneven"] = sinkhorn_knopp_teacher_probs(inputs["t"][:3] if rank == 0 else inputs["t"][3:], 0.1)
    torch.save(result, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_ranks_match_one_process_on_the_global_batch(tmp_path):
    g = torch.Generator().manual_seed(0)
    inputs = {name: torch.randn(8, 16, generator=g) for name in ("z1", "z2", "q", "k", "t")}
    mp.spawn(_rank_main, args=(str(tmp_path / "init"), inputs, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    full = _losses_and_grads(inputs["z1"], inputs["z2"], inputs["q"], inputs["k"])
    for name in ("simclr", "moco", "clip"):  # the global loss is the mean of the ranks' losses
        torch.testing.assert_close(sum(r[name] for r in ranks) / WORLD, full[name])
    for name in ("z1", "z2", "q"):  # DDP averages gradients over ranks: rank grad / WORLD = global grad
        torch.testing.assert_close(torch.cat([r[name] for r in ranks]) / WORLD, full[name])
    for r in ranks:  # DINO's centre: the mean teacher output over the global batch, on every rank
        torch.testing.assert_close(r["center"], inputs["t"].mean(0, keepdim=True))
    # Sinkhorn-Knopp balances the prototypes over the global batch: each rank's rows are the whole batch's
    sinkhorn = torch.cat([r["sinkhorn"] for r in ranks])
    torch.testing.assert_close(sinkhorn, sinkhorn_knopp_teacher_probs(inputs["t"], 0.1))
    uneven = torch.cat([r["sinkhorn_uneven"] for r in ranks])
    torch.testing.assert_close(uneven, sinkhorn_knopp_teacher_probs(inputs["t"], 0.1))
