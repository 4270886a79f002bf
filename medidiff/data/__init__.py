"""medidiff.data"""
