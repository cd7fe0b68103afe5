"""Presentation: heatmaps over pictures, circuitsvis views, HTML reports. Imports the
layers below; nothing below imports it."""
