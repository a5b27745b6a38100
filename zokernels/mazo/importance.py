METHODS = ("mazo",)
def importance(*a, **k): raise NotImplementedError
