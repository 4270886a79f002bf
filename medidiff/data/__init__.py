"""medidiff.data: shipped real MR (train/evaluation split), synthetic subjects and slice-pair datasets.

Submodules are imported lazily by their users (``medidiff.data.shipped``, ``.synth``, ``.datasets``) so that
importing the package stays cheap.
"""
