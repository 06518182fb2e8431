"""losskit.distances"""
