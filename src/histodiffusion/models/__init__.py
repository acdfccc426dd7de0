"""Thin builders around diffusers / timm models."""
