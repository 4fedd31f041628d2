"""Which ops of the vision-feature merge make the host wait on CUDA (torch sync debug mode): `nonzero_static`,
`index_copy` / `index_add` and their backward against `masked_scatter` and its backward.
    python benchmarks/probe_merge_syncs.py    # needs a CUDA GPU
"""
import torch, warnings
torch.cuda.set_sync_debug_mode("warn")
d = "cuda"
ids = torch.randint(0, 10, (1, 5000), device=d)
mask = (ids == 3).flatten()
n = int(mask.sum()); torch.cuda.synchronize()
h = torch.randn(1, 5000, 64, device=d, requires_grad=True)
e = torch.randn(n, 64, device=d, requires_grad=True)
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    idx = torch.nonzero_static(mask, size=n)[:, 0]
    torch._assert_async((mask.sum() == n), "mismatch")
    flat = h.flatten(0, 1)
    out = flat.index_copy(0, idx, e)
    out = out.index_add(0, idx, e * 2)
    out.sum().backward()
    print("nonzero_static/index_copy/index_add + backward syncs:", len(w), [str(x.message)[:80] for x in w][:5])
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    m2 = mask.view(1, -1, 1).expand_as(h)
    out = h.masked_scatter(m2, e)
    out.sum().backward()
    print("masked_scatter + backward syncs:", len(w))
