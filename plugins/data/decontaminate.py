"""(being written)"""
COMPONENTS: list[type] = []
