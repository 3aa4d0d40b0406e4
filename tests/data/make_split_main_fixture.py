"""Writes tests/data/split_main_ab0367b.pt with ke_fast at ab0367b (main when the SplitState work started)."""
import torch
from torch import nn
import ke_fast

def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(5 * 5 * 5, 4))

x = torch.randn(2, 3, 7, 7, generator=torch.Generator().manual_seed(1))
out = {"x": x, "commit": "ab0367b"}
for mode, seed in (("kels", 3), ("wels", 7)):
    m = ke_fast.split(net(), mode, 0.5, seed=seed)
    with torch.no_grad():
        m[0].bias.uniform_(-1, 1)
    out[f"{mode}_state_dict"] = {k: v.clone() for k, v in m.state_dict().items()}
    out[f"{mode}_model"] = m  # a whole-model pickle (torch.save(model))
    with torch.no_grad():
        out[f"{mode}_dense"] = m(x)
        with ke_fast.fit_only(m):
            out[f"{mode}_fit"] = m(x)
    r = __import__("copy").deepcopy(m)
    ke_fast.reinit_(r, 1)
    out[f"{mode}_reinit1"] = {k: v.clone() for k, v in r.state_dict().items()}
torch.save(out, "tests/data/split_main_ab0367b.pt")
