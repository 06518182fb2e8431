"""losskit.heads"""
