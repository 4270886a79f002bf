"""medidiff.data: shipped real MR (train/evaluation split), synthetic subjects and training slice pairs.

Submodules are imported by their users (``medidiff.data.shipped``, ``.synth``, ``.pairs``) so that
importing the package stays cheap.
"""
