"""The decode loop's hidden-row buffer: appending, overwriting after a crop and growing keep every row."""
import torch

from gate.decode.loop import RowBuffer


def test_rows_survive_growth_and_crops():
    buf, want = RowBuffer(), torch.zeros(0, 3)
    for at, n in ((0, 5), (5, 300), (200, 4), (204, 700), (0, 2)):
        rows = torch.randn(n, 3)
        got = buf.put(at, rows)
        want = torch.cat([want[:at], rows])
        assert torch.equal(got, want)
