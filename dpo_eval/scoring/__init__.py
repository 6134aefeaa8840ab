"""The 69 TextDescriptives features of a text, exact and fast, cached by content.
May import: the foundation only.
"""
