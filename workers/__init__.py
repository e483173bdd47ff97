"""blobchain.workers"""
