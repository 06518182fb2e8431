"""losskit.data"""
