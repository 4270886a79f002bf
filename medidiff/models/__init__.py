"""medidiff.models"""
