"""medidiff.physics"""
