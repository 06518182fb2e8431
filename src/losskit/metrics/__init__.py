"""losskit.metrics"""
