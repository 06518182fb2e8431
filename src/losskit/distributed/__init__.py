"""losskit.distributed"""
