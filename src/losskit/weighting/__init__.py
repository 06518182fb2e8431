"""losskit.weighting"""
