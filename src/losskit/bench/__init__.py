"""losskit.bench"""
