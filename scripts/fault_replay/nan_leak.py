import torch
from moldiff.pipeline import MolDiffPipeline
from moldiff.geometry import fully_connected_edges
torch.set_num_threads(1)
st = torch.load("logs/state36.pt")
for prec, comp in [("bf16", True), ("bf16", False), ("fp32", False)]:
    p = MolDiffPipeline.from_pretrained("moldiff/pretrained/qm9").configure_inference(prec, compile=comp)
    for name, keep in [("full", None), ("221-224", [221, 222, 223, 224])]:
        pos, h, batch, t = st["pos"], st["h"], st["batch"], st["t"]
        if keep is not None:
            m = torch.isin(batch, torch.tensor(keep)); pos, h = pos[m], h[m]
            batch = torch.unique(batch[m], return_inverse=True)[1]; t = t[: len(keep)]
        with torch.no_grad():
            ep, eh = p.predict_noise(pos, h, t, batch, edge_index=fully_connected_edges(batch))
        bad = sorted(set(batch[~(torch.isfinite(ep).all(-1) & torch.isfinite(eh).all(-1))].tolist()))
        print(prec, comp, name, "non-finite molecules:", bad[:10], len(bad), flush=True)
