-- placeOrder sent as text, one customer (with the customer's own token) and one product:
-- every order on the same two streams, the flash-sale case.
dofile(os.getenv("WRK_LIB"))
