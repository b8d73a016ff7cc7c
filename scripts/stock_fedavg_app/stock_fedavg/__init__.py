"""Flower's stock FedAvg over SegViz nodes."""
