"""losskit.mining"""
