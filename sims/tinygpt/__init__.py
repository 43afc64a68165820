"""tinygpt"""
