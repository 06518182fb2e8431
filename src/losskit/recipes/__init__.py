"""losskit.recipes"""
