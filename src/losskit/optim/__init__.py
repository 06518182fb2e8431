"""losskit.optim"""
