"""Seeing inside a network: images in, pictures and an HTML report out."""
